"""CI for users: the GitHub Actions workflow runs lint, `dg check defs`, the tests and a `dagster asset
materialize` on tiny data; the materialize script works from a shell (run here for real)."""

import os
import re
import subprocess

import pytest
import yaml

from tests.cluster.helpers import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
SCRIPT = ROOT / "scripts" / "ci_tiny_materialize.sh"


@pytest.fixture(scope="module")
def workflow():
    doc = yaml.safe_load(WORKFLOW.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as a boolean
    return doc


def commands(workflow) -> str:
    return "\n".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])


def test_workflow_runs_lint_checks_tests_and_the_cli_materialization(workflow):
    assert {"push", "pull_request"} <= set(workflow["on"])
    run = commands(workflow)
    makefile = (ROOT / "Makefile").read_text()
    lint_paths = re.search(r"ruff check (.+)", makefile).group(1).strip()
    assert f"ruff check {lint_paths}" in run  # the same paths as `make lint`
    assert ".venv/bin/dg check defs" in run
    assert "make test" in run
    assert "scripts/ci_tiny_materialize.sh" in run
    assert "scripts/install.sh" in run
    for job in workflow["jobs"].values():
        assert job["runs-on"] == "ubuntu-latest" and job["timeout-minutes"] > 0
        assert job["steps"][0]["uses"].startswith("actions/checkout@")
    versions = {s["with"]["python-version"] for j in workflow["jobs"].values() for s in j["steps"]
                if s.get("uses", "").startswith("actions/setup-python")}
    assert versions == {"${{ env.PYTHON_VERSION }}"} and workflow["env"]["PYTHON_VERSION"] == "3.11"
    ruff = re.search(r"^ruff==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert ruff and "grep -E '^ruff==' requirements.lock" in run  # lint uses the locked ruff


def test_image_job_builds_the_dockerfile(workflow):
    (build,) = [s for s in workflow["jobs"]["image"]["steps"]
                if s.get("uses", "").startswith("docker/build-push")]
    assert build["with"]["context"] == "."
    assert "ocm-code-location" in build["with"]["tags"]


def test_tiny_materialize_script_materializes_the_data_slice(tmp_path):
    """The script publishes 200/50 real Fashion-MNIST rows, adds the partition and runs
    `dagster asset materialize` for dataset + preprocessing; it verifies the instance itself."""
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert "registry publish fashion-mnist 1.0.0 --train-rows 200 --val-rows 50" in text
    assert "asset materialize -m ocm_assets.definitions" in text
    env = {k: v for k, v in os.environ.items() if k not in ("OCM_HOME", "DAGSTER_HOME", "OCM_ENV")}
    env.update(TMPDIR=str(tmp_path), NO_COLOR="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "RUN_SUCCESS" in log
    assert re.search(r"fashion_mnist/dataset \[fashion-mnist-v1\.0\.0\]: rows_train=200, rows_val=50", log)
    assert re.search(r"fashion_mnist/preprocessing \[fashion-mnist-v1\.0\.0\]: "
                     r"mean=0\.2\d+, std=0\.3\d+", log)
    assert "Asset check 'schema' on 'fashion_mnist/dataset' passed" in log
    assert list(tmp_path.iterdir()) == []  # the temporary OCM_HOME is removed
