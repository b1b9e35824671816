"""The DVC data registry: a git repo whose tags ``<dataset>-v<semver>`` name dataset versions.

Layout of a version (as in the seed registries)::

    <dataset>/train.parquet   DVC-tracked, pushed to the DVC remote
    <dataset>/val.parquet     DVC-tracked, pushed to the DVC remote
    <dataset>/metadata.json   in git: {"normalization": {"mean", "std"}, ...} or {"label_map": {...}}

``DvcRegistry`` reads any such repo by path or URL (the embedded one under ``.ocm/registry`` or a team's
own). ``RegistryPublisher`` creates and publishes to a working copy the way a data team would (parquet,
``dvc add``, ``dvc push``, commit, annotated tag) and is what ``ocm registry`` runs. The rules of the layout,
the tags and ``metadata.json`` are :mod:`ocm_ml.contract`'s; this module applies them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import dagster as dg
from pydantic import Field

import ocm_ml.contract as contract  # the registry vocabulary has one home
from ocm_ml.contract import SPLITS, TAG_RE, ContractError, DatasetMetadata, DatasetVersion, SplitFile

BATCH_ROWS = 8192  # rows per record batch when a registry parquet file is streamed


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_url_credentials(text: str) -> str:
    """``https://user:token@host/repo`` -> ``https://***@host/repo``: registry URLs may carry a token."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", text)


class RegistryError(RuntimeError):
    """The registry could not answer: the message says what was asked, what was wrong and what to do.

    Credentials in any URL of the message (the repo URL, git's own output) are redacted: the message goes to
    run logs, the UI and sensor ticks."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_url_credentials(str(message)))


@dataclass(frozen=True, order=True)
class RegistryVersion:
    dataset: str
    version: str
    tag: str
    commit: str

    @property
    def semver(self) -> tuple[int, int, int]:
        major, minor, patch = (int(p) for p in self.version.split("."))
        return major, minor, patch


@dataclass(frozen=True)
class TagScan:
    """What ``git ls-remote --tags`` shows for one dataset: valid versions and tags that look wrong."""

    versions: tuple[RegistryVersion, ...]
    malformed: tuple[str, ...]


#: One DVC-tracked file of a version (the contract's record).
FileInfo = SplitFile


def tag_for(dataset: str, version: str) -> str:
    tag = f"{dataset}-v{version.removeprefix('v')}"
    if not TAG_RE.match(tag):
        raise RegistryError(f"{tag!r} is not a valid version tag: use <dataset>-v<major>.<minor>.<patch>")
    return tag


def parse_tag(tag: str) -> tuple[str, str]:
    """:func:`ocm_ml.contract.parse_tag`, failing with a :class:`RegistryError`."""
    try:
        return contract.parse_tag(tag)
    except ContractError as exc:
        raise RegistryError(str(exc)) from None


def _run(cmd: list[str], cwd: Path | None = None, what: str = "", timeout: float | None = None) -> str:
    """Run ``cmd`` without a terminal: git never prompts (for a user name, a password or an SSH passphrase),
    so a registry that wants credentials fails at once. With ``timeout`` the command's whole process group
    (``git`` and the ``git-remote-http``/``ssh`` it spawns) is killed after that many seconds."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never"}
    # A non-interactive askpass or ssh command set by the deployment (a token script in CI) is kept.
    for name, value in (("GIT_ASKPASS", "false"), ("SSH_ASKPASS", "false"), ("SSH_ASKPASS_REQUIRE", "never"),
                        ("GIT_SSH_COMMAND", "ssh -oBatchMode=yes")):
        env.setdefault(name, value)
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=timeout is not None,
        )
    except FileNotFoundError as exc:
        raise RegistryError(f"{cmd[0]} is not installed or not on PATH ({what})") from exc
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise RegistryError(
            f"{what or ' '.join(cmd)}: no answer within {timeout:g} s, so it was stopped. Check that the URL "
            "is right and that its host is reachable from here (network, firewall, proxy); a registry that "
            "wants credentials needs a credential helper, a token or an SSH key, since git never prompts "
            "here. A slow but working registry needs a larger DvcRegistry.git_timeout_s."
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        detail = (stderr or stdout).strip()
        hint = ""
        if any(s in detail for s in ("terminal prompts disabled", "could not read Username",
                                     "Permission denied", "Authentication failed",
                                     "Host key verification failed")):
            hint = (" (the registry asks for credentials, and git never prompts here: configure a credential "
                    "helper, a token in the environment or an SSH key for this host)")
        raise RegistryError(f"{what or ' '.join(cmd)} failed: {detail}{hint}")
    return stdout


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and, when it leads its own session, everything it spawned; then reap it."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.communicate()


def _dvc_cmd() -> list[str]:
    return [sys.executable, "-m", "dvc"]


class DataRegistry(dg.ConfigurableResource):
    """Interface of a versioned data registry; assets and sensors annotate this type.

    Implementations: :class:`DvcRegistry` (a git+DVC repo by path or URL).
    """

    def scan(self, dataset: str) -> TagScan:
        raise NotImplementedError

    def list_versions(self, dataset: str) -> list[RegistryVersion]:
        return list(self.scan(dataset).versions)

    def resolve(self, tag: str) -> RegistryVersion:
        raise NotImplementedError

    def file_info(self, version: RegistryVersion, path: str) -> FileInfo:
        raise NotImplementedError

    @contextmanager
    def open(self, version: RegistryVersion, path: str, mode: str = "rb") -> Iterator[IO[Any]]:
        raise NotImplementedError
        yield  # pragma: no cover

    def read_text(self, version: RegistryVersion, path: str) -> str:
        with self.open(version, path, mode="r") as fh:
            return fh.read()

    def read_metadata(self, version: RegistryVersion) -> DatasetMetadata:
        """The version's ``metadata.json``, parsed and checked by :func:`ocm_ml.contract.parse_metadata`."""
        path = contract.metadata_path(version.dataset)
        try:
            return contract.parse_metadata(self.read_text(version, path), where=f"{path} at {version.tag}")
        except ContractError as exc:
            raise RegistryError(str(exc)) from None

    @contextmanager
    def parquet(self, version: RegistryVersion, path: str) -> Iterator[Any]:
        """A registry parquet file (a split, the holdout) as a ``pyarrow.parquet.ParquetFile``: the one way
        ocm opens one. Read row groups or batches from it inside the ``with``."""
        import pyarrow.parquet as pq

        with self.open(version, path) as fh:
            try:
                parquet = pq.ParquetFile(fh)
            except Exception as exc:
                raise RegistryError(f"{path} at {version.tag} is not a readable parquet file: {exc}") from exc
            yield parquet

    def iter_batches(self, version: RegistryVersion, path: str, columns: list[str] | None = None,
                     batch_rows: int = BATCH_ROWS) -> Iterator[Any]:
        """Stream a registry parquet file in record batches (never the whole table at once)."""
        with self.parquet(version, path) as parquet:
            yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)

    def dataset_version(self, version: RegistryVersion, kind: str) -> DatasetVersion:
        """The typed record of ``version``: its split files (URL, md5) and its metadata, checked for a dataset
        of ``kind`` (``image`` or ``text``)."""
        metadata = self.read_metadata(version)
        try:
            metadata.require(kind, where=f"{contract.metadata_path(version.dataset)} at {version.tag}")
        except ContractError as exc:
            raise RegistryError(str(exc)) from None
        files = {s: self.file_info(version, contract.split_path(version.dataset, s)) for s in SPLITS}
        return DatasetVersion(registry_tag=version.tag, commit=version.commit, files=files, metadata=metadata)

    def holdout(self, dataset: str) -> RegistryVersion | None:
        """The dataset's fixed holdout (tag ``holdout/<dataset>``, file ``holdout/<dataset>.parquet``: rows no
        version may train on), or None when the registry has none."""
        raise NotImplementedError


class DvcRegistry(DataRegistry):
    """A git+DVC data registry read through ``git ls-remote`` and ``dvc.api``.

    Example::

        registry = DvcRegistry(repo_url="/path/to/registry")        # or https://…/registry.git
        version = registry.resolve("fashion-mnist-v1.0.0")
        info = registry.file_info(version, "fashion-mnist/train.parquet")  # url in the DVC remote, md5
    """

    repo_url: str = Field(description="Path or git URL of the registry repo (a bare file:// URL works too).")
    remote: str | None = Field(
        default=None, description="DVC remote to read from; the repo's default remote when unset."
    )
    git_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="Seconds a `git ls-remote` of the registry may take before it is stopped with a "
        "RegistryError (a black-holed URL then fails a sensor tick instead of hanging it; Dagster stops a "
        "sensor evaluation after 60 s by default).",
    )

    def _ls_remote_tags(self) -> dict[str, str]:
        out = _run(
            ["git", "ls-remote", "--tags", "--", self.repo_url],
            what=f"listing tags of the registry {self.repo_url} (is the path or URL right and reachable?)",
            timeout=self.git_timeout_s,
        )
        tags: dict[str, str] = {}
        peeled: dict[str, str] = {}
        for line in out.splitlines():
            sha, _, ref = line.partition("\t")
            name = ref.removeprefix("refs/tags/")
            if name.endswith("^{}"):
                peeled[name[:-3]] = sha
            else:
                tags[name] = sha
        # Annotated tags point at a tag object; the peeled ref is the commit.
        return {name: peeled.get(name, sha) for name, sha in tags.items()}

    def scan(self, dataset: str) -> TagScan:
        prefix = f"{dataset}-"
        versions, malformed = [], []
        for name, commit in self._ls_remote_tags().items():
            if not name.startswith(prefix):
                continue
            match = TAG_RE.match(name)
            if match and match["dataset"] == dataset:
                versions.append(RegistryVersion(dataset, match["version"], name, commit))
            else:
                malformed.append(name)
        versions.sort(key=lambda v: v.semver)
        return TagScan(tuple(versions), tuple(sorted(malformed)))

    def resolve(self, tag: str) -> RegistryVersion:
        dataset, version = parse_tag(tag)
        scan = self.scan(dataset)
        for v in scan.versions:
            if v.tag == tag:
                return v
        known = ", ".join(v.tag for v in scan.versions) or "none"
        raise RegistryError(
            f"unknown tag {tag!r} in registry {self.repo_url}; versions of {dataset}: {known}. "
            "Publish it with `ocm registry publish` or pick an existing tag."
        )

    def _fs(self, version: RegistryVersion):
        from dvc.api import DVCFileSystem

        try:
            return DVCFileSystem(self.repo_url, rev=version.commit, remote=self.remote)
        except Exception as exc:
            raise RegistryError(
                f"cannot open registry {self.repo_url} at {version.tag} ({version.commit[:10]}): {exc}"
            ) from exc

    def _missing(self, version: RegistryVersion, path: str, cause: Exception | None = None) -> RegistryError:
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        try:
            have = sorted(p.rsplit("/", 1)[-1] for p in self._fs(version).ls(folder or "/", detail=False))
        except Exception:
            have = []
        if path.rsplit("/", 1)[-1] in have:
            # Tracked at this revision, yet unreadable: the data is not in the DVC remote.
            return RegistryError(
                f"cannot read {path} at {version.tag} from registry {self.repo_url}: it is tracked, but the "
                f"DVC remote{f' {self.remote!r}' if self.remote else ''} does not hold its data ({cause}). "
                "Is the DVC remote reachable and was `dvc push` run when the version was published?"
            )
        return RegistryError(
            f"{path} is missing in registry {self.repo_url} at {version.tag}"
            + (f"; {folder}/ holds {have}" if have else "")
            + ". Publish the version with all of train.parquet, val.parquet and metadata.json."
        )

    def file_info(self, version: RegistryVersion, path: str) -> FileInfo:
        import dvc.api

        fs = self._fs(version)
        try:
            info = fs.info(path)
        except FileNotFoundError as exc:
            raise self._missing(version, path) from exc
        dvc_info = info.get("dvc_info") or {}
        md5 = dvc_info.get("md5") or info.get("md5")
        if not md5:
            raise RegistryError(
                f"{path} at {version.tag} is not tracked by DVC (no md5); track data files with `dvc add`"
            )
        try:
            url = dvc.api.get_url(path, repo=self.repo_url, rev=version.commit, remote=self.remote)
        except Exception as exc:
            raise RegistryError(
                f"cannot resolve the DVC remote URL of {path} at {version.tag}: {exc}") from exc
        return FileInfo(path=path, url=url, md5=md5, size=int(info.get("size") or 0))

    @contextmanager
    def open(self, version: RegistryVersion, path: str, mode: str = "rb") -> Iterator[IO[Any]]:
        import dvc.api
        from dvc.exceptions import PathMissingError

        try:
            handle = dvc.api.open(path, repo=self.repo_url, rev=version.commit, remote=self.remote, mode=mode)
            fh = handle.__enter__()
        except (FileNotFoundError, PathMissingError) as exc:
            raise self._missing(version, path, exc) from exc
        except Exception as exc:
            raise RegistryError(
                f"cannot read {path} at {version.tag} from registry {self.repo_url}: {exc}. "
                "Is the DVC remote reachable and was `dvc push` run when the version was published?"
            ) from exc
        try:
            yield fh
        finally:
            handle.__exit__(None, None, None)


    def holdout(self, dataset: str) -> RegistryVersion | None:
        tag = contract.holdout_tag(dataset)
        commit = self._ls_remote_tags().get(tag)
        return None if commit is None else RegistryVersion(dataset, "holdout", tag, commit)


class RegistryPublisher:
    """Creates a git+DVC registry working copy and publishes dataset versions to it.

    Example::

        pub = RegistryPublisher(Path(".ocm/registry"), remote_dir=Path(".ocm/dvc-remote"))
        pub.init()
        pub.publish("fashion-mnist", "1.0.0", {"train": train_table, "val": val_table}, metadata)
    """

    def __init__(self, root: Path, remote_dir: Path | None = None):
        self.root = Path(root).resolve()
        self.remote_dir = Path(remote_dir).resolve() if remote_dir else None

    def _git(self, *args: str, what: str = "") -> str:
        return _run(["git", *args], cwd=self.root, what=what or f"git {' '.join(args)} in {self.root}")

    def _dvc(self, *args: str) -> str:
        return _run([*_dvc_cmd(), *args], cwd=self.root, what=f"dvc {' '.join(args)} in {self.root}")

    def is_initialised(self) -> bool:
        return (self.root / ".git").is_dir() and (self.root / ".dvc").is_dir()

    def init(self) -> bool:
        """Create the repo, DVC and its local remote; returns False when it already existed."""
        if self.is_initialised():
            return False
        if self.remote_dir is None:
            raise RegistryError("a new registry needs a DVC remote folder (remote_dir)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.remote_dir.mkdir(parents=True, exist_ok=True)
        self._git("init", "-q", "-b", "main")
        self._git("config", "user.name", "ocm registry")
        self._git("config", "user.email", "registry@ocm.local")
        self._dvc("init", "-q")
        self._dvc("config", "core.analytics", "false")
        self._dvc("remote", "add", "-d", "local", str(self.remote_dir))
        (self.root / "README.md").write_text(
            "# ocm data registry\n\nDatasets under `<dataset>/`; versions are tags `<dataset>-v<semver>`.\n"
        )
        self._git("add", "-A")
        self._git("commit", "-q", "-m", "Initialise the data registry (git + DVC, local remote)")
        return True

    def publish(
        self,
        dataset: str,
        version: str,
        tables: Mapping[str, Any],
        metadata: Mapping[str, Any],
        message: str | None = None,
        force: bool = False,
        files: Mapping[str, bytes] | None = None,
    ) -> RegistryVersion:
        """Write ``tables`` (split name → pyarrow Table) as DVC-tracked parquet, metadata.json in git,
        commit, tag ``<dataset>-v<version>`` (annotated) and push the data to the DVC remote.

        ``force`` moves an existing tag to the new commit. ``files`` adds extra raw files (tests use it to
        publish broken versions).
        """
        import pyarrow.parquet as pq

        if not self.is_initialised():
            raise RegistryError(f"{self.root} is not a registry; run `ocm registry init` first")
        tag = tag_for(dataset, version)
        existing = self._git("tag", "--list", tag).strip()
        if existing and not force:
            raise RegistryError(
                f"tag {tag} already exists in {self.root}; publish a new version number, "
                "or pass --force to move the tag to new content"
            )
        if "train" in tables:
            self._refuse_holdout_overlap(dataset, tables["train"])
        folder = self.root / dataset
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.parquet*"):
            if stale.name.removesuffix(".dvc").removesuffix(".parquet") not in tables:
                stale.unlink()
        tracked = []
        for split, table in tables.items():
            path = folder / f"{split}.parquet"
            pq.write_table(table, path, row_group_size=8192, compression="zstd")
            tracked.append(str(path.relative_to(self.root)))
        for name, payload in (files or {}).items():
            (folder / name).write_bytes(payload)
        (folder / "metadata.json").write_text(json.dumps(dict(metadata), indent=2, sort_keys=True) + "\n")
        if tracked:
            self._dvc("add", "-q", *tracked)
        self._git("add", "-A", dataset)
        if self._git("status", "--porcelain").strip():
            self._git("commit", "-q", "-m", message or f"{dataset} {version}")
        tag_args = ["tag", "-a", tag, "-m", message or f"{dataset} version {version}"]
        if force:
            tag_args.insert(1, "-f")
        self._git(*tag_args)
        if tracked:
            self._dvc("push", "-q")
        commit = self._git("rev-list", "-n", "1", tag).strip()
        return RegistryVersion(dataset, version, tag, commit)

    def has_tag(self, tag: str) -> bool:
        return bool(self._git("tag", "--list", tag).strip())

    def _holdout_table(self, dataset: str):
        """The published holdout of ``dataset`` (read from git + the DVC cache at its tag), or None."""
        tag = contract.holdout_tag(dataset)
        if not self.has_tag(tag):
            return None
        reader = DvcRegistry(repo_url=str(self.root))
        version = RegistryVersion(dataset, "holdout", tag, self._git("rev-list", "-n", "1", tag).strip())
        with reader.parquet(version, contract.holdout_path(dataset)) as parquet:
            return parquet.read()

    def _refuse_holdout_overlap(self, dataset: str, train) -> None:
        holdout = self._holdout_table(dataset)
        if holdout is None:
            return
        held = set(contract.row_keys(holdout))
        overlap = [i for i, key in enumerate(contract.row_keys(train)) if key in held]
        if overlap:
            raise RegistryError(
                f"refusing to publish {dataset}: {len(overlap)} row(s) of the train split are in the holdout "
                f"{contract.holdout_tag(dataset)} (first train rows: {overlap[:5]}). No version may train on "
                "the holdout: remove those rows (ocm's own versions are built from the data minus the "
                "holdout)."
            )

    def publish_holdout(self, dataset: str, table, message: str | None = None) -> RegistryVersion:
        """Publish the dataset's fixed holdout once: ``holdout/<dataset>.parquet`` (DVC), tag
        ``holdout/<dataset>``. A holdout is never replaced: every model is judged on the same rows."""
        import pyarrow.parquet as pq

        if not self.is_initialised():
            raise RegistryError(f"{self.root} is not a registry; run `ocm registry init` first")
        tag = contract.holdout_tag(dataset)
        if self.has_tag(tag):
            raise RegistryError(
                f"{tag} already exists in {self.root}: a holdout is fixed, so that every model version of "
                f"{dataset} is judged on the same rows"
            )
        path = self.root / contract.holdout_path(dataset)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=8192, compression="zstd")
        rel = str(path.relative_to(self.root))
        self._dvc("add", "-q", rel)
        self._git("add", "-A", str(path.parent.relative_to(self.root)))
        self._git("commit", "-q", "-m", message or f"{dataset} holdout ({table.num_rows} rows)")
        self._git("tag", "-a", tag, "-m", message or f"{dataset} holdout: rows no version may train on")
        self._dvc("push", "-q")
        return RegistryVersion(dataset, "holdout", tag, self._git("rev-list", "-n", "1", tag).strip())

    def delete_tag(self, tag: str) -> None:
        self._git("tag", "-d", tag)
