"""Ray Jobs for ocm: run a driver module on the head of a Ray cluster and wait for its result.

A step that reaches Ray only through Ray Client (``ray://``) cannot run drivers that use Ray Data or Ray
Train (they need a core worker, ray-project/ray#48682; Ray's docs: use Ray Jobs for ML workloads). It
submits them through the head's dashboard (``JobSubmissionClient``) instead: :func:`run_job` runs
``python -m <module> '<spec json>'`` there, forwards the job's log, stops the job when the step is
interrupted, and reads the JSON result the driver wrote.

Credentials go only into the job's ``runtime_env`` env vars, never into its entrypoint or metadata (the
dashboard shows those); every error text is redacted of them. ``ray`` is imported inside functions only.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOG_TAIL_CHARS = 4000


class RayJobError(RuntimeError):
    """A Ray Job failed, was stopped, or did not finish; the message has its status, message and log tail."""


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header for a head with Ray token authentication: the token from RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ``~/.ray/auth_token`` (Ray's own lookup order); empty when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
        try:
            token = Path(path).read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def redact(text: str, secrets: Mapping[str, str]) -> str:
    for value in secrets.values():
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def run_job(
    dashboard_url: str,
    module: str,
    spec: Mapping[str, Any],
    *,
    result_path: str,
    filesystem: Any = None,
    env_vars: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    poll_s: float = 2.0,
    timeout_s: float = 6 * 3600.0,
    submission_id: str | None = None,
) -> dict[str, Any]:
    """Run ``python -m <module> '<spec json>'`` as a Ray Job at ``dashboard_url`` and return the JSON
    object the driver wrote at ``result_path`` (on the pyarrow ``filesystem``, local disk when None).

    ``env_vars`` (credentials) reach only the job's runtime environment. Each new log line goes to ``log``.
    Raises :class:`RayJobError` when the job does not succeed within ``timeout_s``; the job is stopped
    whenever this call ends before the job did (an interrupted step, a timeout)."""
    from ray.job_submission import JobSubmissionClient

    secrets = dict(env_vars or {})
    entrypoint = f"python -m {shlex.quote(module)} {shlex.quote(json.dumps(dict(spec)))}"
    for value in secrets.values():
        if value and value in entrypoint:
            raise ValueError("a credential is in the job's spec: pass it through env_vars only")
    try:
        client = JobSubmissionClient(dashboard_url, headers=auth_headers())
        job_id = client.submit_job(
            entrypoint=entrypoint, submission_id=submission_id,
            runtime_env={"env_vars": secrets} if secrets else None,
        )
    except Exception as exc:
        raise RayJobError(
            f"Could not submit the Ray Job to {dashboard_url}: {redact(str(exc), secrets)}. The head's "
            "dashboard must be reachable there (OCM_RAY_DASHBOARD_URL) and the step needs the head's token "
            "(RAY_AUTH_TOKEN)."
        ) from None
    if log:
        log(f"Submitted Ray Job {job_id} to {dashboard_url}: python -m {module}")
    done, seen = False, 0
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            info = client.get_job_info(job_id)
            logs = client.get_job_logs(job_id)
            if log and len(logs) > seen:
                for line in logs[seen:].splitlines():
                    if line.strip():
                        log(redact(line, secrets))
                seen = len(logs)
            status = str(getattr(info.status, "value", info.status))
            if status in TERMINAL:
                done = True
                break
            if time.monotonic() > deadline:
                raise RayJobError(f"Ray Job {job_id} did not finish within {timeout_s:.0f} s "
                                  f"(status {status})")
            time.sleep(poll_s)
    finally:
        if not done:
            try:
                client.stop_job(job_id)
            except Exception:
                pass
    if status != "SUCCEEDED":
        tail = logs[-LOG_TAIL_CHARS:]
        raise RayJobError(redact(
            f"Ray Job {job_id} ({module}) {status}: {info.message or ''}\n--- log tail ---\n{tail}", secrets
        ))
    return _read_result(result_path, filesystem, job_id)


def _read_result(path: str, filesystem: Any, job_id: str) -> dict[str, Any]:
    from pyarrow import fs

    target = filesystem or fs.LocalFileSystem()
    try:
        with target.open_input_stream(path) as stream:
            data = json.loads(stream.read().decode())
    except (OSError, ValueError) as exc:
        raise RayJobError(f"Ray Job {job_id} succeeded but its result at {path} is unreadable: "
                          f"{exc}") from None
    if not isinstance(data, dict):
        raise RayJobError(f"Ray Job {job_id} wrote {type(data).__name__} at {path}, not a JSON object")
    return data
