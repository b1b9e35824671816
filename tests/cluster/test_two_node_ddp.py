"""DDP across two Ray nodes on this machine: a head and a worker node joined to it with `ray start`, one CPU
each, so the two Ray Train workers must land on different nodes; checkpoints go to a folder both nodes see
(the shared storage of this one-machine cluster) or, as on the cluster, to S3 (an S3 server on 127.0.0.1)
through CheckpointStorage. Proves that training assumes nothing about a single node.

The Ray processes are this test's own: each `ray start --block` runs in a new session and is killed by its
process group at teardown (never `ray stop`, which would stop other Ray clusters on the machine), and any
stray process that names this test's temp folder is killed by PID."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.cluster.helpers import REGION, ROOT, SECRETS, free_port, s3_keys
from tests.registry_helpers import image_version

pytestmark = pytest.mark.slow  # two Ray nodes + DDP: 2-4 minutes on a busy 2-core machine


def ray_env() -> dict[str, str]:
    # Not inherited: another Ray's address and token, and ocm's single-node setting, which a test that ran
    # ocm_resources.ray.single_node_ray earlier in this process left in os.environ (two nodes need it off).
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    # a loaded machine needs more than Ray's default 30 s for a raylet to register
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONWARNINGS="ignore",
               RAY_raylet_start_wait_time_s="180")
    return env


def start_node(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
         "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
         f"--object-store-memory={256 * 1024**2}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}", *args],
        env=ray_env(), start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )


def wait_for_nodes(address: str, count: int, procs, logs, timeout: float = 240) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout
    while True:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                pytest.fail(f"ray start exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        out = subprocess.run([sys.executable, "-c", code, address], env=ray_env(), capture_output=True,
                             text=True, timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{count} Ray nodes did not come up: {out.stdout[-500:]} {out.stderr[-2000:]}\n"
                        + "\n".join(log.read_text()[-1500:] for log in logs))
        time.sleep(2)


def our_processes(roots: set[int], marker: str) -> set[int]:
    """PIDs of the `ray start` processes ``roots``, their descendants (Ray's workers make themselves process
    group leaders, so killing the group is not enough), their process groups, and anything whose command
    line names this test's temp folder (``marker``)."""
    children: dict[int, list[int]] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid, pgid = (int(x) for x in stat.rsplit(")", 1)[1].split()[1:3])
        children.setdefault(ppid, []).append(pid)
        if pgid in roots or marker in cmdline:
            found.add(pid)
    found |= roots
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found - {os.getpid()}


def kill_by_pid(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)  # gcs_server and raylet ignore SIGTERM (FACTS.md)
        except OSError:
            pass


@pytest.fixture(scope="module")
def two_nodes():
    temp = Path(tempfile.mkdtemp(prefix="ocm2n-", dir="/tmp"))  # Ray's socket paths must stay short
    port = free_port()
    address = f"127.0.0.1:{port}"
    logs = [temp / "head.log", temp / "worker.log"]
    handles = [log.open("w") for log in logs]
    procs = [start_node(["--head", f"--port={port}", f"--ray-client-server-port={free_port()}",
                         "--include-dashboard=false", f"--temp-dir={temp / 'h'}"], handles[0])]
    try:
        wait_for_nodes(address, 1, procs, logs[:1])
        procs.append(start_node([f"--address={address}", f"--temp-dir={temp / 'w'}"], handles[1]))
        wait_for_nodes(address, 2, procs, logs)
        yield {"address": address, "temp": temp}
    finally:
        kill_by_pid(our_processes({p.pid for p in procs}, str(temp)))
        for proc in procs:
            proc.wait()
        time.sleep(1)
        kill_by_pid(our_processes(set(), str(temp)))  # anything that was starting meanwhile
        for handle in handles:
            handle.close()
        shutil.rmtree(temp, ignore_errors=True)


def run_driver(two_nodes, tmp_path, storage: str, *extra: str, env: dict | None = None) -> dict:
    tables, metadata = image_version(n_train=192, n_val=64)
    for split, table in tables.items():
        pq.write_table(table, tmp_path / f"{split}.parquet")
    out = tmp_path / "result.json"
    norm = metadata["normalization"]
    driver = subprocess.run(
        [sys.executable, "-m", "tests.cluster.ddp_driver", "--address", two_nodes["address"],
         "--train", str(tmp_path / "train.parquet"), "--val", str(tmp_path / "val.parquet"),
         "--mean", str(norm["mean"]), "--std", str(norm["std"]), "--storage", storage, "--out", str(out),
         *extra],
        cwd=ROOT, env={**ray_env(), **(env or {})}, capture_output=True, text=True, timeout=1200,
    )
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-5000:]
    report = json.loads(out.read_text())
    assert len(report["nodes"]) == 2 and set(report["nodes"].values()) == {1.0}
    for seen in ("workers_live", "workers_after"):
        assert len(report[seen]) == 2, report[seen]  # one actor per worker rank
        assert set(report[seen].values()) == set(report["nodes"]), f"{seen}: both nodes must host a worker"
    assert report["num_workers"] == 2 and report["epochs"] == 2
    assert report["val_accuracy"] is not None and report["train_rows"] > 0
    assert report["loaded_parameters"] > 10_000_000  # ResNet18, read back from the storage
    return report


def test_ddp_across_a_head_and_a_worker_node(two_nodes, tmp_path):
    shared = two_nodes["temp"] / "shared-checkpoints"
    shared.mkdir()
    report = run_driver(two_nodes, tmp_path, str(shared))
    # the checkpoint is on the shared storage, complete
    checkpoint = Path(report["checkpoint_path"])
    assert checkpoint.is_relative_to(shared) and Path(report["checkpoint_file"]).stat().st_size > 1_000_000
    assert list((Path(report["storage_path"]) / "two-node-ddp").glob("checkpoint_*"))


def test_ddp_across_two_nodes_checkpoints_to_s3(two_nodes, tmp_path, s3):
    """The cluster's storage: both nodes' workers reach S3 through the (pickled) pyarrow filesystem."""
    credentials = {**{k: SECRETS[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                   "AWS_REGION": REGION}
    report = run_driver(two_nodes, tmp_path, "s3://ocm-checkpoints/two-node", "--s3-endpoint", s3["endpoint"],
                        env=credentials)
    prefix = report["storage_path"].split("/", 1)[1] + "/two-node-ddp/"
    stored = s3_keys(s3, "ocm-checkpoints", prefix)
    best = report["checkpoint_path"].split("/", 1)[1]
    assert any(key.startswith(best + "/") and key.endswith(".ckpt") for key in stored), stored
