"""A k8s-shaped run on one machine: the retrain and rollout jobs as the cluster path runs them.

- One process per step: Dagster's multiprocess executor (``OCM_EXECUTOR=multiprocess`` on the cluster
  branch of ``ocm_resources/env.py``), as ``k8s_job_executor`` gives each step a pod.
- Steps hand their outputs over only through the shared S3 IO manager (``cluster_io_manager``) on a real S3
  server: moto in server mode, its own process, with IAM authentication enforced and an IAM user whose keys
  the steps get from the environment (the Secret of the cluster); wrong keys are refused.
- Ray is reached only through Ray Client (``ray://``) from step processes that run no raylet: a long-lived
  head started here with token authentication, like the KubeRay head of ``deploy/``.
- The endpoint is served by that head, at its Serve URL, and keeps answering after every step process ended.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from tests.cluster.helpers import REGION, ROOT, free_port, s3_keys
from tests.cluster.k8s_shaped_defs import FAMILY, retrain_job, rollout_job
from tests.registry_helpers import image_version, new_registry, publish_holdout

VENV_BIN = Path(sys.executable).parent
IO_BUCKET, CHECKPOINT_BUCKET = "ocm-dagster-io", "ocm-checkpoints"
TRAIN = {"num_workers": 1, "batch_size": 32, "epochs": 1, "learning_rate": 3e-3, "seed": 0}
GATE = {"floors": {"accuracy": 0.0}, "win_margin": 0.01}
ENDPOINT = {"replica_cpus": 0.25, "known_answer_rows": 4}


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{what} did not listen on {port} within {timeout:.0f} s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """End a process this test started, and its children: it was started as the leader of its own session,
    so its process group is its PID (Ray's gcs_server and raylet ignore SIGTERM)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_iam(tmp_path_factory):
    """moto's S3 + IAM server in its own process on a free loopback port with authentication enforced
    after the three unauthenticated calls that create the test's IAM user, its policy and its keys."""
    import boto3

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, stdout=log.open("w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_port(port, proc, "moto server", log)
        endpoint = f"http://127.0.0.1:{port}"
        bootstrap = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "bootstrap",
                     "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **bootstrap)
        iam.create_user(UserName="ocm-steps")
        iam.put_user_policy(UserName="ocm-steps", PolicyName="ocm-s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }))
        key = iam.create_access_key(UserName="ocm-steps")["AccessKey"]
        keys = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                              aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
        for bucket in (IO_BUCKET, CHECKPOINT_BUCKET):
            client.create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "client": client, "keys": keys, "region": REGION}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A long-lived Ray head in its own process (``ray start --head --block``), Ray Client on a free port,
    every port of its own, token authentication on (the token in the environment, as the Secret gives it)."""
    tmp = tmp_path_factory.mktemp("ray")
    temp_dir = Path("/tmp") / f"ocm-k8s-{os.getpid()}"  # Ray's socket paths must stay short
    log = tmp / "head.log"
    token = secrets.token_hex(16)
    names = ("ray-client-server-port", "port", "dashboard-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "serve")
    free: set[int] = set()
    while len(free) < len(names):  # the OS may hand the same free port out twice
        free.add(free_port())
    ports = dict(zip(names, sorted(free), strict=True))
    client_port, serve_port = ports["ray-client-server-port"], ports.pop("serve")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(ROOT), "RAY_idle_worker_killing_time_threshold_ms": "60000",
           # a Ray Job's entrypoint runs `python` from the head's PATH: the venv's, as the image's on KubeRay
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         *(f"--{name}={port}" for name, port in ports.items()),
         "--num-cpus=2", f"--object-store-memory={512 * 1024**2}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_port(client_port, proc, "Ray head (client server)", log)
        _wait_port(ports["dashboard-port"], proc, "Ray head (dashboard)", log)
        yield {"client": f"ray://127.0.0.1:{client_port}", "gcs": f"127.0.0.1:{ports['port']}",
               "token": token, "serve_port": serve_port,
               "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}",
               "temp_dir": temp_dir}
    finally:
        _stop(proc)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def test_wrong_s3_credentials_are_refused(s3_iam):
    import boto3
    from botocore.exceptions import ClientError

    from ocm_resources.io import S3IOManager

    wrong = boto3.client("s3", endpoint_url=s3_iam["endpoint"], region_name=REGION,
                         aws_access_key_id=s3_iam["keys"]["AWS_ACCESS_KEY_ID"], aws_secret_access_key="wrong")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied"):
        wrong.list_objects_v2(Bucket=IO_BUCKET)
    unknown = S3IOManager(bucket=IO_BUCKET, endpoint_url=s3_iam["endpoint"], region=REGION,
                          access_key_id="AKIAUNKNOWNKEY000000", secret_access_key="nope")
    with pytest.raises(dg.DagsterResourceFunctionError) as refused:  # when the step starts, not later
        with dg.build_resources({"io_manager": unknown}):
            pass
    assert isinstance(refused.value.__cause__, ClientError)
    assert "InvalidAccessKeyId" in str(refused.value.__cause__)
    assert s3_iam["client"].list_objects_v2(Bucket=IO_BUCKET)["KeyCount"] == 0  # the right keys work


def test_retrain_and_rollout_one_process_per_step(s3_iam, ray_head, tmp_path, monkeypatch):
    started = time.monotonic()
    pub, _ = new_registry(tmp_path)
    publish_holdout(pub)
    version = pub.publish("fashion-mnist", "1.0.0", *image_version(n_train=160, n_val=48, seed=0))

    # what a step pod gets from the ConfigMap and Secrets; nothing here lets a step start a Ray of its own
    env = {
        "OCM_ENV": "cluster", "OCM_EXECUTOR": "multiprocess",
        "OCM_REGISTRY_URL": str(pub.root), "OCM_K8S_HOME": str(tmp_path / "ocm"),
        "OCM_CHECKPOINT_PATH": f"s3://{CHECKPOINT_BUCKET}/ray-results",
        "OCM_S3_ENDPOINT": s3_iam["endpoint"], "AWS_REGION": REGION, **s3_iam["keys"],
        "OCM_IO_BUCKET": IO_BUCKET, "OCM_IO_PREFIX": "dagster/io",
        "OCM_K8S_RAY_CLIENT": ray_head["client"], "OCM_RAY_DASHBOARD_URL": ray_head["dashboard"],
        "OCM_SERVE_PORT": str(ray_head["serve_port"]),
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head["token"],
        "RAY_USAGE_STATS_ENABLED": "0", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)

    assert retrain_job().executor_def.name == "multiprocess"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(FAMILY.partitions_name, [version.tag])
        tags = {"dagster/partition": version.tag}
        train_config = {"ops": {f"{FAMILY.name}__model": {"config": TRAIN}}}
        first = dg.execute_job(dg.reconstructable(retrain_job), instance=instance, tags=tags,
                               run_config=train_config)
        # every step passes; the training step reaches Ray through ray:// and runs its driver as a Ray Job
        # on the head (Ray Data needs a core worker, which a Ray Client driver has not: ray-project/ray#48682)
        assert first.success, _failures(first)
        passed = {e.step_key for e in first.all_events if e.event_type_value == "STEP_SUCCESS"}
        assert passed == {f"{FAMILY.name}__{a}" for a in ("dataset", "preprocessing", "model")}, passed
        jobs = [j for j in _jobs(ray_head) if j.status == "SUCCEEDED"]
        assert len(jobs) == 1, _jobs(ray_head)
        assert "-m ocm_ml.vision.train_job " in jobs[0].entrypoint, jobs[0].entrypoint
        for secret in s3_iam["keys"].values():  # credentials only in the runtime env, not the entrypoint
            assert secret not in jobs[0].entrypoint and secret not in json.dumps(jobs[0].metadata or {})
        model = next(e for e in first.all_events if e.event_type_value == "ASSET_MATERIALIZATION"
                     and e.asset_key == dg.AssetKey([FAMILY.name, "model"]))
        model_meta = model.materialization.metadata
        accuracy, history = model_meta["val_accuracy"].value, model_meta["history"].value
        assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0, accuracy
        assert isinstance(history, list) and len(history) == 1, history
        # the steps handed their outputs over through the S3 server (pickles under the IO prefix)
        io_keys = s3_keys(s3_iam, IO_BUCKET, "dagster/io/")
        for asset in ("dataset", "preprocessing"):
            assert f"dagster/io/{FAMILY.name}/{asset}/{version.tag}" in io_keys, io_keys
        # Ray Train's checkpoints went to the checkpoint bucket on S3, not to a disk of the step
        assert s3_keys(s3_iam, CHECKPOINT_BUCKET, f"ray-results/{FAMILY.name}/{version.tag}/")

        # the step processes reached Ray as Ray Client clients (the training step, the endpoint step): each
        # connection got its own server on the head; no step process started a raylet (the head's session has
        # exactly one)
        session = ray_head["temp_dir"] / "session_latest" / "logs"
        client_servers = sorted(p.name for p in session.glob("ray_client_server_*.out"))
        assert len(client_servers) >= 1, sorted(p.name for p in session.iterdir())
        assert len(list(session.glob("raylet*.out"))) == 1

        # one process per step, none of them this one
        pids = _step_pids(first)
        assert len(pids) == 3 and len(set(pids.values())) == 3 and os.getpid() not in pids.values(), pids

        rollout = dg.execute_job(
            dg.reconstructable(rollout_job), instance=instance, tags=tags,
            run_config={"ops": {f"{FAMILY.name}__champion": {"config": GATE},
                                f"{FAMILY.name}__endpoint": {"config": ENDPOINT}}},
        )
        assert rollout.success, _failures(rollout)

        pids = _step_pids(first, rollout)  # + evaluation, champion, endpoint
        assert len(pids) == 6 and len(set(pids.values())) == 6, pids

    # the endpoint is served by the long-lived head, at its URL, after every step process ended
    url = f"http://127.0.0.1:{ray_head['serve_port']}/{FAMILY.name}"
    health = _get(f"{url}/health")
    assert health["status"] == "healthy" and health["model_uri"].endswith("/1"), health
    assert _get(f"{url}/info")["data_version"] == version.tag
    request = urllib.request.Request(f"{url}/predict", data=json.dumps({"images": [[0] * 784]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert len(json.loads(resp.read())["predictions"]) == 1
    print(f"k8s-shaped retrain + rollout: {time.monotonic() - started:.0f} s")


def test_failed_training_job_fails_with_its_error(ray_head, tmp_path, monkeypatch):
    """A Ray Job whose driver fails: the call raises with the job's status and error text, and the
    credential handed to the job's runtime env appears nowhere in that text."""
    from ocm_resources.ray import RayHead
    from ocm_resources.ray_jobs import RayJobError

    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head["token"])
    missing = tmp_path / "no-such-train.parquet"
    spec = {"train_url": str(missing), "val_url": str(missing), "mean": 0.5, "std": 0.25,
            "settings": TRAIN, "storage_path": str(tmp_path / "ckpt"), "run_name": "bad",
            "result_path": str(tmp_path / "ckpt" / "train_result.json"), "s3": None}
    secret = "k8s-shaped-" + secrets.token_hex(8)
    head = RayHead(address=ray_head["client"], jobs_url=ray_head["dashboard"])
    lines: list[str] = []
    with pytest.raises(RayJobError) as failed:
        head.run_job("ocm_ml.vision.train_job", spec, spec["result_path"],
                     env_vars={"AWS_SECRET_ACCESS_KEY": secret}, log=lines.append, poll_s=1.0)
    text = str(failed.value)
    assert "FAILED" in text and "no-such-train.parquet" in text, text
    assert secret not in text and all(secret not in line for line in lines)
    assert not (tmp_path / "ckpt" / "train_result.json").exists()


def _jobs(ray_head) -> list:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head["dashboard"],
                                 headers={"Authorization": f"Bearer {ray_head['token']}"})
    jobs = [j for j in client.list_jobs() if str(j.type.value) == "SUBMISSION"]  # not Ray Client drivers
    return sorted(jobs, key=lambda j: j.start_time or 0)


def _failures(result) -> str:
    return "\n".join(
        f"{e.step_key}: {e.event_specific_data.error.to_string()[-3000:]}"
        for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    )


def _step_pids(*results) -> dict[str, int]:
    """{run/step: pid of the process that ran it}."""
    return {f"{r.run_id[:8]}/{e.step_key}": e.pid for r in results for e in r.all_events
            if e.event_type_value == "STEP_START"}
