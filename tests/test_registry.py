"""The DVC registry for real: git + DVC repos in a temporary folder, published and read back."""

import gzip
import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from ocm_resources.registry import DvcRegistry, RegistryError, parse_tag, tag_for
from tests.registry_helpers import image_split, image_version, new_registry, text_version


@pytest.fixture
def registry(tmp_path):
    pub, reg = new_registry(tmp_path)
    tables, metadata = image_version()
    v1 = pub.publish("fashion-mnist", "1.0.0", tables, metadata)
    return pub, reg, v1, tables


def test_publish_list_resolve_read(registry):
    pub, reg, v1, tables = registry
    assert [v.tag for v in reg.list_versions("fashion-mnist")] == ["fashion-mnist-v1.0.0"]
    assert reg.resolve("fashion-mnist-v1.0.0") == v1
    assert v1.commit == subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=pub.root, text=True).strip()
    # annotated tag, data in DVC not git
    assert subprocess.check_output(["git", "cat-file", "-t", v1.tag], cwd=pub.root,
                                   text=True).strip() == "tag"
    tracked = subprocess.check_output(["git", "ls-files", "fashion-mnist"], cwd=pub.root, text=True).split()
    assert sorted(tracked) == [
        "fashion-mnist/.gitignore",
        "fashion-mnist/metadata.json",
        "fashion-mnist/train.parquet.dvc",
        "fashion-mnist/val.parquet.dvc",
    ]
    info = reg.file_info(v1, "fashion-mnist/train.parquet")
    dvc_file = (pub.root / "fashion-mnist/train.parquet.dvc").read_text()
    assert f"md5: {info.md5}" in dvc_file
    # the URL points into the pushed DVC remote and holds the same bytes
    assert info.url.startswith(str(pub.remote_dir))
    assert pq.read_table(info.url).equals(tables["train"])
    with reg.open(v1, "fashion-mnist/val.parquet") as fh:
        assert pq.read_table(fh).num_rows == tables["val"].num_rows
    assert reg.read_metadata(v1).classes[0] == "T-shirt/top"


def test_versions_sorted_by_semver_and_malformed_reported(registry):
    pub, reg, _, tables = registry
    _, metadata = image_version()
    pub.publish("fashion-mnist", "1.10.0", tables, metadata)
    pub.publish("fashion-mnist", "1.2.0", tables, metadata)
    subprocess.run(["git", "tag", "fashion-mnist-vbeta"], cwd=pub.root, check=True)
    subprocess.run(["git", "tag", "fashion-mnist-1.3"], cwd=pub.root, check=True)
    scan = reg.scan("fashion-mnist")
    assert [v.version for v in scan.versions] == ["1.0.0", "1.2.0", "1.10.0"]
    assert scan.malformed == ("fashion-mnist-1.3", "fashion-mnist-vbeta")
    assert reg.list_versions("tweet-sentiment") == []


def test_unknown_tag_is_a_clear_error(registry):
    _, reg, _, _ = registry
    with pytest.raises(RegistryError, match=r"unknown tag 'fashion-mnist-v9.9.9'.*fashion-mnist-v1.0.0"):
        reg.resolve("fashion-mnist-v9.9.9")
    with pytest.raises(RegistryError, match="not a registry version tag"):
        reg.resolve("latest")


def test_missing_file_is_a_clear_error(registry):
    pub, reg, _, _ = registry
    tables, metadata = image_version()
    broken = pub.publish("fashion-mnist", "1.1.0", {"train": tables["train"]}, metadata)
    with pytest.raises(RegistryError,
                       match=r"fashion-mnist/val.parquet is missing .* at fashion-mnist-v1.1.0"):
        reg.file_info(broken, "fashion-mnist/val.parquet")
    with pytest.raises(RegistryError, match="is missing"):
        with reg.open(broken, "fashion-mnist/val.parquet"):
            pass


def test_unreachable_repo_and_remote(registry, tmp_path):
    pub, reg, v1, _ = registry
    with pytest.raises(RegistryError, match="listing tags of the registry .*nowhere"):
        DvcRegistry(repo_url=str(tmp_path / "nowhere")).scan("fashion-mnist")
    # the data lives only in the DVC remote (and the working copy's cache): read from a clone without the
    # remote
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(pub.root), str(clone)], check=True)
    shutil.rmtree(pub.remote_dir)
    with pytest.raises(RegistryError, match=r"cannot read fashion-mnist/train.parquet .*DVC remote"):
        with DvcRegistry(repo_url=str(clone)).open(v1, "fashion-mnist/train.parquet"):
            pass


def test_existing_tag_needs_force_and_force_moves_it(registry):
    pub, reg, v1, _ = registry
    tables, metadata = image_version(seed=7)
    with pytest.raises(RegistryError, match="already exists"):
        pub.publish("fashion-mnist", "1.0.0", tables, metadata)
    moved = pub.publish("fashion-mnist", "1.0.0", tables, metadata, force=True)
    assert moved.commit != v1.commit
    assert reg.resolve("fashion-mnist-v1.0.0").commit == moved.commit
    assert (reg.file_info(moved, "fashion-mnist/train.parquet").md5
            != reg.file_info(v1, "fashion-mnist/train.parquet").md5)


def test_team_registry_by_url(registry, tmp_path):
    """The same reader works against someone else's registry: a bare clone addressed by file:// URL."""
    pub, _, v1, tables = registry
    bare = tmp_path / "team-registry.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(pub.root), str(bare)], check=True)
    subprocess.run(["git", "push", "-q", "--tags", str(bare)], cwd=pub.root, check=True)
    team = DvcRegistry(repo_url=f"file://{bare}")
    v = team.resolve("fashion-mnist-v1.0.0")
    assert v.commit == v1.commit
    with team.open(v, "fashion-mnist/train.parquet") as fh:
        assert pq.read_table(fh).num_rows == tables["train"].num_rows


@pytest.mark.parametrize("tag, ok", [("fashion-mnist-v1.0.0", True), ("tweet-sentiment-v10.2.33", True),
                                     ("fashion-mnist-v1.0", False), ("fashion-mnist", False),
                                     ("v1.0.0", False)])
def test_tag_grammar(tag, ok):
    if ok:
        dataset, version = parse_tag(tag)
        assert tag_for(dataset, version) == tag
    else:
        with pytest.raises(RegistryError):
            parse_tag(tag)


def _write_idx(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        header = struct.pack(">IIII", 2051, *array.shape)
    else:
        header = struct.pack(">II", 2049, array.shape[0])
    with gzip.open(folder / f"{name}.gz", "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _ocm(*args, env_home):
    import os

    env = {**os.environ, "OCM_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-m", "ocm_cli", *args], capture_output=True, text=True, env=env)


def test_cli_publishes_from_idx_files_and_csv(tmp_path):
    idx = tmp_path / "idx"
    train, val = image_split(120, 0), image_split(30, 1)
    _write_idx(idx, "train-images-idx3-ubyte", train.images)
    _write_idx(idx, "train-labels-idx1-ubyte", train.labels)
    _write_idx(idx, "t10k-images-idx3-ubyte", val.images)
    _write_idx(idx, "t10k-labels-idx1-ubyte", val.labels)
    home = tmp_path / "home"
    out = _ocm("registry", "publish", "fashion-mnist", "1.0.0", "--source", str(idx), env_home=home)
    assert out.returncode == 0, out.stderr
    # the last fifth of the 30 test images is the holdout, in no version
    assert "published holdout/fashion-mnist" in out.stdout and "(6 rows" in out.stdout
    assert "published fashion-mnist-v1.0.0" in out.stdout and "train 120, val 24" in out.stdout
    out = _ocm("registry", "publish", "fashion-mnist", "1.1.0", "--source", str(idx), "--resplit-seed", "3",
               "--train-rows", "100", env_home=home)
    assert out.returncode == 0, out.stderr
    reg = DvcRegistry(repo_url=str(home / "registry"))
    v11 = reg.resolve("fashion-mnist-v1.1.0")
    meta = reg.read_metadata(v11).raw
    assert meta["rows"] == {"train": 100, "val": 24} and "re-split with seed 3" in meta["source"]
    assert meta["normalization"]["mean"] == pytest.approx(train.images.mean() / 255, abs=0.05)

    csv = tmp_path / "tweets.csv"
    rows = ["sentiment,confidence,text"] + [f"{s},1.0,tweet number {i} is {s}" for i, s in
                                            enumerate(["negative", "neutral", "positive"] * 20)]
    csv.write_text("\n".join(rows) + "\n", encoding="latin-1")
    out = _ocm("registry", "publish", "tweet-sentiment", "1.0.0", "--source", str(csv), env_home=home)
    assert out.returncode == 0, out.stderr
    listed = _ocm("registry", "list", env_home=home).stdout.split()
    assert {"fashion-mnist-v1.0.0", "fashion-mnist-v1.1.0", "tweet-sentiment-v1.0.0"} <= set(listed)
    shown = json.loads(_ocm("registry", "show", "tweet-sentiment-v1.0.0", env_home=home).stdout)
    assert shown["metadata"]["label_map"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert shown["files"]["train"]["md5"]


def test_cli_bad_input_says_what_to_do(tmp_path):
    home = tmp_path / "home"
    out = _ocm("registry", "publish", "fashion-mnist", "1.0.0", "--source", str(tmp_path / "empty"),
               env_home=home)
    assert (out.returncode == 2 and "train-images-idx3-ubyte" in out.stderr
            and "dataset-fashion-mnist" in out.stderr)
    out = _ocm("registry", "publish", "fashion-mnist", "one", env_home=home)
    assert out.returncode == 2 and "not a valid version tag" in out.stderr
    out = _ocm("registry", "show", "fashion-mnist-v3.0.0", env_home=home)
    assert out.returncode == 2 and "unknown tag" in out.stderr


def test_text_versions_publish(tmp_path):
    pub, reg = new_registry(tmp_path)
    tables, metadata = text_version()
    v = pub.publish("tweet-sentiment", "1.0.0", tables, metadata)
    assert reg.read_metadata(v).label_map["2"] == "positive"


# --- git without a terminal, with a deadline -------------------------------------------------------------


@pytest.fixture
def black_hole():
    """A TCP port on 127.0.0.1 that accepts connections (the kernel completes the handshake) and never
    answers: what a firewalled or wedged registry host looks like to git."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


def _in_thread(fn, deadline_s):
    """Run ``fn`` in a thread and return the error it raised; fail (rather than hang the suite) when it is
    still running after the deadline (a bounded wait, not a measurement)."""
    import threading

    out = {}

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the asserting thread
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(deadline_s)
    assert not thread.is_alive(), f"still running after {deadline_s} s"
    return out.get("error")


@pytest.mark.parametrize("scheme", ["git", "http"])
def test_black_holed_registry_times_out_and_its_helpers_die(black_hole, scheme, monkeypatch, git_waits):
    """Checks that git was waited for with ``git_timeout_s`` exactly, then killed (SIGKILL) with its helpers,
    and that the error names the timeout and the setting to raise."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    port = black_hole.getsockname()[1]
    url = f"{scheme}://127.0.0.1:{port}/repo.git"
    reg = DvcRegistry(repo_url=url, git_timeout_s=1.5)
    error = _in_thread(lambda: reg.scan("fashion-mnist"), deadline_s=60)
    assert isinstance(error, RegistryError), error
    assert "no answer within 1.5 s" in str(error) and "git_timeout_s" in str(error)
    command, timeout, proc = git_waits[0]
    assert command == ["git", "ls-remote", "--tags", "--", url] and timeout == 1.5, (command, timeout)
    assert {id(p) for _, _, p in git_waits} == {id(proc)}  # one git, no retry
    assert proc.returncode == -9  # stopped by the timeout's SIGKILL, not ended on its own
    # the process that held the connection (git itself for git://, git-remote-http for http://) was killed
    # with its group: the server sees the connection closed
    black_hole.settimeout(5)
    conn, _ = black_hole.accept()
    with conn:
        conn.settimeout(5)
        while conn.recv(4096):
            pass


def test_a_registry_that_asks_for_credentials_fails_at_once(git_waits):
    """Checks that git ends by itself on the 401 (its own exit status, never the timeout's kill) and the error
    says credentials are needed; a prompting git would sit until the 30 s timeout and be killed instead."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    asked = []

    class AsksForPassword(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="registry"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), AsksForPassword)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reg = DvcRegistry(repo_url=f"http://127.0.0.1:{server.server_port}/repo.git", git_timeout_s=30)
        with pytest.raises(RegistryError, match=r"asks for credentials, and git never prompts") as failed:
            reg.scan("fashion-mnist")
    finally:
        server.shutdown()
        server.server_close()
    assert "no answer within" not in str(failed.value)
    assert asked and all(p.startswith("/repo.git/info/refs") for p in asked), asked
    (command, timeout, proc), *_ = git_waits
    assert command[:3] == ["git", "ls-remote", "--tags"] and timeout == 30
    assert proc.returncode > 0, proc.returncode  # git gave up on the 401 itself; -9 would be the timeout


def test_a_url_that_looks_like_an_option_is_a_url(tmp_path, monkeypatch):
    """``git ls-remote --tags -- <url>``: without the ``--``, this URL would run a command via
    --upload-pack."""
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(tmp_path / "elsewhere")], cwd=work, check=True)
    monkeypatch.chdir(work)
    marker = tmp_path / "ran"
    with pytest.raises(RegistryError, match="listing tags of the registry --upload-pack"):
        DvcRegistry(repo_url=f"--upload-pack=touch {marker}").scan("fashion-mnist")
    assert not marker.exists()


def test_registry_and_serving_loader_read_metadata_by_the_same_rules(tmp_path):
    from ocm_ml.serve.loading import LoadError, read_dataset_metadata

    pub, reg = new_registry(tmp_path)
    tables, metadata = text_version()
    good = pub.publish("tweet-sentiment", "1.0.0", tables, metadata)
    parsed, md5 = read_dataset_metadata(str(pub.root), good.tag, good.commit)
    assert parsed == reg.read_metadata(good) and parsed.label_map["2"] == "positive" and len(md5) == 32
    gap = pub.publish("tweet-sentiment", "1.1.0", tables, {"label_map": {"0": "negative", "2": "positive"}})
    with pytest.raises(RegistryError, match="label_map keys must be the ids 0..1"):
        reg.read_metadata(gap)
    with pytest.raises(LoadError, match="label_map keys must be the ids 0..1"):
        read_dataset_metadata(str(pub.root), gap.tag, gap.commit)


def test_registry_errors_never_carry_url_credentials(tmp_path):
    from ocm_resources.registry import DvcRegistry, RegistryError

    url = "https://ocm-bot:s3cr3t-token@127.0.0.1:9/data/registry.git"
    with pytest.raises(RegistryError) as info:
        DvcRegistry(repo_url=url, git_timeout_s=5).list_versions("fashion-mnist")
    text = str(info.value)
    assert "s3cr3t-token" not in text and "ocm-bot" not in text
    assert "https://***@127.0.0.1:9/data/registry.git" in text  # still says which registry it was
