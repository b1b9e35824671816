"""A real `mlflow server` for tests: MLflow's basic-auth app (as deploy/mlflow.yaml runs it) on 127.0.0.1,
sqlite backends and proxied local artifacts in a temporary folder, its port chosen by the OS at bind time.

    with mlflow_server(tmp_path, username="ci", password="pw") as server:
        server.url, server.log_text(), server.auth  # ("ci", "pw")
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class MlflowServer:
    url: str
    log: Path
    auth: tuple[str, str]

    def log_text(self) -> str:
        return self.log.read_text()


@contextmanager
def mlflow_server(root: Path, username: str, password: str, timeout_s: float = 240) -> Iterator[MlflowServer]:
    """Starts the server, waits until it answers /health, yields it, and kills its process group.

    ``username`` is the admin the auth app creates at its first start (MLflow ships none); every other
    caller has no permission at all, and a request without credentials or with a wrong password gets 401."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update({
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,  # read once, when the auth app creates the admin
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "ocm-tests-csrf-key",  # the auth app's CSRF protection needs one
    })  # fmt: skip
    log = root / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--app-name", "basic-auth",
             "--host", "127.0.0.1", "--port", "0", "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout_s
        url = None
        while True:
            if url is None:
                found = _LISTENING.search(log.read_text())
                url = f"http://127.0.0.1:{found.group(1)}" if found else None
            if url is not None:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not come up:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
        yield MlflowServer(url=url, log=log, auth=(username, password))
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
