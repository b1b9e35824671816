"""The loop under the real daemon: ``dagster-daemon run`` on a temporary instance (ocm's dagster.yaml, its
rollout queue limit) and a workspace of its own; a version published with the ``ocm`` CLI from the real
Fashion-MNIST that ships. No sensor is ticked and no run is executed by this test: the daemon's registry
sensor asks for the ingest run, its automation sensors for training and the rollout, its run queue launches
them as processes of their own, and the endpoint ends up serving the new version over HTTP. Then a corrupt
version (normalization that does not match its data) fails its blocking check in its ingest run, the daemon
asks for nothing more for it, and the endpoint keeps serving the first version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from ocm_resources.env import LOCAL_INSTANCE_YAML
from ocm_resources.registry import RegistryPublisher
from tests.registry_helpers import image_version
from tests.serve.daemon_defs import FAMILY

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: The longest the whole chain may take on a loaded 2-core machine before the test gives up (a bound on a
#: wait, not a timing assertion).
CHAIN_DEADLINE_S = 900


def _info(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/info", timeout=10) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs())


def _describe(instance: dg.DagsterInstance) -> str:
    return "\n".join(f"{r.job_name} {r.tags.get('dagster/partition')} {r.status.value} "
                     f"{sorted(r.asset_selection or [])}" for r in reversed(_runs(instance)))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, ray_local, serve_http):
    from ray import serve

    serve.delete(FAMILY.name)
    root = tmp_path_factory.mktemp("daemon")
    dagster_home = root / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(LOCAL_INSTANCE_YAML)
    (root / "workspace.yaml").write_text(
        "load_from:\n  - python_module:\n      module_name: tests.serve.daemon_defs\n"
        f"      location_name: daemon_e2e\n      working_directory: {ROOT}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "PYTEST_"))}
    env.update(
        DAGSTER_HOME=str(dagster_home), OCM_HOME=str(root / "ocm"), OCM_DAEMON_TEST_HOME=str(root / "ocm"),
        OCM_REGISTRY_URL=str(root / "registry"),
        OCM_DAEMON_TEST_RAY=ray_local.get_runtime_context().gcs_address,
        OCM_DAEMON_TEST_SERVE_PORT=serve_http.rsplit(":", 1)[1], OCM_SENSOR_INTERVAL_SECONDS="5",
        PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", RAY_USAGE_STATS_ENABLED="0",
    )
    log = root / "daemon.log"
    proc = subprocess.Popen(
        [str(VENV_BIN / "dagster-daemon"), "run", "-w", str(root / "workspace.yaml")], cwd=ROOT, env=env,
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            yield {"root": root, "env": env, "instance": instance, "proc": proc, "log": log,
                   "url": f"{serve_http}/{FAMILY.name}"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        serve.delete(FAMILY.name)


def _wait_for(daemon, what: str, done) -> None:
    """Poll ``done()`` until it is true; fail with the runs and the daemon's log when the daemon died or the
    deadline passed."""
    deadline = time.monotonic() + CHAIN_DEADLINE_S
    while not done():
        if daemon["proc"].poll() is not None or time.monotonic() > deadline:
            state = "exited" if daemon["proc"].poll() is not None else "still running"
            pytest.fail(f"{what}: not reached (daemon {state}).\nruns:\n{_describe(daemon['instance'])}\n"
                        f"daemon log:\n{daemon['log'].read_text()[-6000:]}")
        time.sleep(2)


def test_daemon_retrains_promotes_and_serves_a_published_tag_and_stops_a_corrupt_one(daemon):
    instance, url, env = daemon["instance"], daemon["url"], daemon["env"]
    registry = daemon["root"] / "registry"
    published = subprocess.run(
        [str(VENV_BIN / "ocm"), "registry", "publish", "fashion-mnist", "1.0.0", "--train-rows", "320",
         "--val-rows", "80", "--registry", str(registry), "--remote", str(daemon["root"] / "dvc-remote")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert published.returncode == 0, published.stderr[-3000:]
    assert "published fashion-mnist-v1.0.0" in published.stdout, published.stdout
    tag = "fashion-mnist-v1.0.0"

    _wait_for(daemon, f"the endpoint serving {tag}", lambda: (_info(url) or {}).get("data_version") == tag)
    # the endpoint answers on the new model while its run still finishes the rollout: wait for every run
    _wait_for(daemon, "every run finished", lambda: all(r.is_finished for r in _runs(instance)))
    info = _info(url)
    assert info is not None and info["model_uri"].endswith("/1"), info

    runs = {r.run_id: r for r in _runs(instance)}
    launched = {(r.tags.get("dagster/sensor_name"),
                 tuple(sorted(k.to_user_string() for k in r.asset_selection or [])))
                for r in runs.values()}
    # every run came from one of the daemon's sensors, none from this test
    assert all(sensor for sensor, _ in launched), launched
    # the registry sensor's run is the ingest job (the dataset alone; the job selects it, the run does not)
    assert any(r.tags.get("dagster/sensor_name") == FAMILY.sensor_name
               and r.job_name == f"{FAMILY.name}_ingest"
               and r.tags.get("dagster/partition") == tag for r in runs.values()), _describe(instance)
    assert any(sensor == f"{FAMILY.name}_training_automation" and f"{FAMILY.name}/model" in assets
               for sensor, assets in launched), launched
    assert any(sensor == f"{FAMILY.name}_rollout_automation" and f"{FAMILY.name}/endpoint" in assets
               for sensor, assets in launched), launched
    assert info["dagster_run_id"] in {r.run_id for r in runs.values()
                                      if dg.AssetKey([FAMILY.name, "model"]) in (r.asset_selection or set())}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs.values()), _describe(instance)
    # each run was a process of its own, launched by the daemon's run queue (not this test's process)
    assert {r.tags.get("ocm/rollout") for r in runs.values()
            if dg.AssetKey([FAMILY.name, "endpoint"]) in (r.asset_selection or set())} == {FAMILY.name}

    # a corrupt version: its normalization does not match its pixels
    pub = RegistryPublisher(registry, remote_dir=daemon["root"] / "dvc-remote")
    tables, metadata = image_version(n_train=160, n_val=40, seed=5)
    bad = pub.publish("fashion-mnist", "1.1.0", tables,
                      {**metadata, "normalization": {"mean": 0.9, "std": 0.1}})

    model_key = dg.AssetKey([FAMILY.name, "model"])

    def trained_bad():  # the training automation's run of the bad partition (preprocessing + model), finished
        return any(r.tags.get("dagster/partition") == bad.tag and model_key in (r.asset_selection or set())
                   and r.is_finished for r in _runs(instance))

    _wait_for(daemon, f"the training run of {bad.tag}", trained_bad)
    training = next(r for r in _runs(instance)
                    if r.tags.get("dagster/partition") == bad.tag
                    and model_key in (r.asset_selection or set()))
    checks = {}
    for record in instance.all_logs(training.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = record.dagster_event.asset_check_evaluation_data  # type: ignore[union-attr]
        checks[evaluation.check_name] = evaluation.passed
    assert checks.get("normalization_matches_data") is False, checks
    started = {record.dagster_event.step_key  # type: ignore[union-attr]
               for record in instance.all_logs(training.run_id, of_type=dg.DagsterEventType.STEP_START)}
    assert f"{FAMILY.name}__model" not in started, started  # the blocking check stopped the model step

    # the rollout automation evaluates its conditions several times after that run and asks for nothing
    finished = time.time()

    def rollout_ticked_twice_since():
        state = next((s for s in instance.all_instigator_state()
                      if s.name == f"{FAMILY.name}_rollout_automation"), None)
        if state is None:
            return False
        ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, after=finished, limit=10)
        return len(ticks) >= 2

    _wait_for(daemon, "two rollout-automation ticks after the corrupt version's training run",
              rollout_ticked_twice_since)
    evaluation_key = dg.AssetKey([FAMILY.name, "evaluation"])
    assert not [r for r in _runs(instance) if r.tags.get("dagster/partition") == bad.tag
                and evaluation_key in (r.asset_selection or set())], _describe(instance)
    info = _info(url)
    assert info is not None and info["data_version"] == tag and info["model_uri"].endswith("/1"), info
