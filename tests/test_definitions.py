"""The code location loads fast, through the CLIs CI users run, and has the graph DESIGN.md describes."""

import os
import subprocess
import sys

import dagster as dg

from tests.conftest import PROJECT_ROOT

HEAVY = ("torch", "ray", "lightning", "transformers", "mlflow", "dvc", "pandera")
BIN = os.path.dirname(sys.executable)


def _run(*cmd, dagster_home=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "NO_COLOR": "1"}
    env.pop("DAGSTER_HOME", None)
    if dagster_home:
        env["DAGSTER_HOME"] = str(dagster_home)
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_definitions_import_no_heavy_modules():
    code = (
        "import sys, ocm_assets.definitions as d; "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules)); d.defs"
    )
    out = _run(sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"heavy modules imported at load: {out.stdout.strip()}"


def test_dagster_definitions_validate_module_and_workspace(tmp_path):
    for args in (["-m", "ocm_assets.definitions"], ["-w", "workspace.yaml"]):
        out = _run(f"{BIN}/dagster", "definitions", "validate", *args, dagster_home=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "All code locations passed validation" in out.stdout + out.stderr


def test_dg_check_defs(tmp_path):
    out = _run(f"{BIN}/dg", "check", "defs", dagster_home=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All definitions loaded successfully" in out.stdout + out.stderr


def test_graph_shape():
    from ocm_assets.definitions import defs
    from ocm_assets.families import FAMILIES

    graph = defs.resolve_asset_graph()
    for fam in FAMILIES:
        ds, pre = dg.AssetKey([fam.name, "dataset"]), dg.AssetKey([fam.name, "preprocessing"])
        assert ds in graph.get_all_asset_keys()
        assert ds in graph.get(pre).parent_keys
        assert graph.get(ds).partitions_def.name == fam.partitions_name
        assert defs.get_job_def(fam.retrain_job_name)
        sensor = defs.get_sensor_def(fam.sensor_name)
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
        checks = {k.name for k in graph.asset_check_keys if k.asset_key in (ds, pre)}
        assert "schema" in checks and len(checks) == 2
