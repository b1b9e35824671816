"""Screenshot the Dagster UI's asset lineage graph with headless Chromium (Debian's ``chromium``).

    .venv/bin/python scripts/screenshot_lineage.py          # own webserver, docs/lineage.png + groups
    .venv/bin/python scripts/screenshot_lineage.py --url http://127.0.0.1:3000   # a running `make dev` UI
    .venv/bin/python scripts/screenshot_lineage.py --group fashion_mnist --out /tmp/fm.png

Without ``--url`` it starts ``dagster-webserver -w workspace.yaml`` on a free loopback port with a throwaway
``DAGSTER_HOME`` (telemetry off) and ``OCM_HOME``, waits until the code location is loaded, takes the
screenshots and stops the webserver's process group. The page is driven over the Chrome DevTools protocol:
open the route, wait until the graph's nodes are in the DOM and have stopped moving, then capture a PNG.

Routes (Dagster 1.13 UI): ``/asset-groups`` is "Global asset lineage" (every asset of every location);
``/locations/<repo>@<location>/asset-groups/<group>`` is one group's graph.

The webserver helpers (``start_webserver``, ``graphql``, ``stop_webserver``) are shared with
``tests/test_lineage_ui.py``. Standard library only, plus ``websocket-client`` (in requirements.lock) for
DevTools.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LOCATION = "ocm"
REPOSITORY = "__repository__"


# --------------------------------------------------------------------------------------------- webserver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Webserver:
    url: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    tmp: Path | None = None
    owns_tmp: bool = False
    started_at: float = field(default_factory=time.monotonic)

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def graphql(url: str, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
    """POST a query to ``<url>/graphql``; return ``data`` or raise with the errors."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        payload = json.loads(resp.read())
    if payload.get("errors"):
        raise RuntimeError(f"GraphQL errors: {json.dumps(payload['errors'])[:2000]}")
    return payload["data"]


LOCATION_STATUS_QUERY = """
query LocationStatus {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""


def wait_until_loaded(server: Webserver, timeout: float = 150) -> None:
    """Wait until ``/server_info`` answers and the ``ocm`` code location has finished loading."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(
                f"dagster-webserver exited with {server.proc.returncode}:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/server_info", timeout=5) as resp:
                json.loads(resp.read())
            data = graphql(server.url, LOCATION_STATUS_QUERY, timeout=30)["workspaceOrError"]
            entries = {e["name"]: e for e in data.get("locationEntries", [])}
            entry = entries.get(LOCATION)
            if entry is None:
                last = f"location {LOCATION!r} not in workspace: {data}"
            elif entry["loadStatus"] == "LOADED":
                err = entry["locationOrLoadError"] or {}
                if err.get("__typename") == "PythonError":
                    raise RuntimeError(
                        f"code location {LOCATION!r} failed to load: {err['message']}\n"
                        + "".join(err.get("stack") or [])
                    )
                return
            else:
                last = f"location {LOCATION!r} is {entry['loadStatus']}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1)
    raise TimeoutError(
        f"webserver at {server.url} not ready after {timeout:.0f}s ({last}):\n{server.log_tail()}"
    )


def start_webserver(tmp: Path | None = None, port: int | None = None, timeout: float = 150) -> Webserver:
    """Start ``dagster-webserver -w workspace.yaml`` from the project root on loopback, in its own process
    group, with a fresh DAGSTER_HOME (telemetry off) and OCM_HOME under ``tmp``; return once loaded."""
    owns_tmp = tmp is None
    tmp = Path(tempfile.mkdtemp(prefix="ocm-lineage-")) if tmp is None else Path(tmp)
    dagster_home = tmp / "dagster_home"
    ocm_home = tmp / "ocm_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    ocm_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = port or free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "OCM_HOME": str(ocm_home),
        "OCM_ENV": "local",
        "PYTHONWARNINGS": "ignore",
        "NO_COLOR": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("OCM_REGISTRY_URL", None)
    log_path = tmp / "webserver.log"
    log = open(log_path, "wb")
    cmd = [str(VENV_BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(
        cmd,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    server = Webserver(
        url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, tmp=tmp, owns_tmp=owns_tmp
    )
    try:
        wait_until_loaded(server, timeout=timeout)
    except BaseException:
        stop_webserver(server)
        raise
    return server


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def stop_webserver(server: Webserver) -> None:
    """SIGTERM the webserver's process group (webserver + its code-server child), SIGKILL after 15 s."""
    proc = server.proc
    if proc is not None and proc.poll() is None:
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    if proc is not None:
        _kill_group(proc.pid, signal.SIGKILL)  # stragglers of the group (the gRPC code server)
    if server.owns_tmp and server.tmp is not None:
        shutil.rmtree(server.tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- chromium


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        "no chromium on PATH: `apt-get install -y chromium` (or OCM_INSTALL_CHROMIUM=1 scripts/install.sh)"
    )


class DevTools:
    """A headless Chromium and one page, driven over the DevTools protocol (websocket-client)."""

    def __init__(self, width: int, height: int, scale: float = 1.0, timeout: float = 60):
        import websocket  # websocket-client, in requirements.lock

        self.profile = Path(tempfile.mkdtemp(prefix="ocm-chromium-"))
        port = free_port()
        self.proc = subprocess.Popen(
            [
                find_chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "--remote-debugging-address=127.0.0.1",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        ws_url = None
        while time.monotonic() < deadline and ws_url is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
                    pages = [t for t in json.loads(resp.read()) if t.get("type") == "page"]
                if pages:
                    ws_url = pages[0]["webSocketDebuggerUrl"]
            except (TimeoutError, urllib.error.URLError, ConnectionError):
                pass
            if ws_url is None:
                time.sleep(0.5)
        if ws_url is None:
            self.close()
            raise TimeoutError("chromium DevTools did not answer")
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self._id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")
        # Before any page script runs: dismiss the UI's "Join the Dagster community" dialog (shown on
        # localhost until dismissed in this browser profile) and collapse the left navigation to icons, so
        # the graph gets the width.
        self.send(
            "Page.addScriptToEvaluateOnNewDocument",
            {
                "source": "try { localStorage.setItem('communityNux', 'true');"
                " localStorage.setItem('dagster-nav-collapsed', 'true'); } catch (e) {}"
            },
        )
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": False},
        )

    def send(self, method: str, params: dict | None = None) -> dict:
        self._id += 1
        msg_id = self._id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return res.get("result", {}).get("value")

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            _kill_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        _kill_group(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.profile, ignore_errors=True)


# What "rendered" means: the graph's asset nodes are in the DOM (their labels are asset names) and the
# page no longer shows a loading spinner. Returns the node labels it found, a fingerprint of the layout
# (to wait until it stops moving) and the number of node boxes.
PROBE_JS = r"""
(() => {
  const wanted = %s;
  const text = document.body ? document.body.innerText : "";
  const found = wanted.filter((w) => text.includes(w));
  const spinners = document.querySelectorAll('[role="progressbar"], [class*="Spinner"], [class*="spinner"]').length;
  const nodes = Array.from(document.querySelectorAll('foreignObject, [data-testid*="asset-node"]'));
  const fp = nodes.map((n) => { const r = n.getBoundingClientRect(); return [r.x|0, r.y|0, r.width|0, r.height|0].join(","); }).join(";");
  return {found, spinners, nodes: nodes.length, fp, title: document.title};
})()
"""  # noqa: E501 (the JavaScript is sent as it is: wrapping would change the string)


def capture(
    page_url: str,
    out: Path,
    expect: list[str],
    width: int = 1600,
    height: int = 1000,
    scale: float = 1.0,
    timeout: float = 120,
    settle: float = 3.0,
) -> dict:
    """Open ``page_url``, wait until every label in ``expect`` is on the page, no spinner shows and the node
    layout is stable for ``settle`` seconds, then write a PNG to ``out``. Returns the last probe."""
    out.parent.mkdir(parents=True, exist_ok=True)
    browser = DevTools(width, height, scale)
    try:
        browser.send("Page.navigate", {"url": page_url})
        deadline = time.monotonic() + timeout
        stable_since, last_fp, probe = None, None, {}
        while time.monotonic() < deadline:
            time.sleep(1)
            probe = browser.eval(PROBE_JS % json.dumps(expect)) or {}
            ready = (
                set(probe.get("found", [])) == set(expect)
                and probe.get("nodes", 0) > 0
                and not probe.get("spinners")
            )
            if not ready:
                stable_since, last_fp = None, None
                continue
            if probe["fp"] != last_fp:
                stable_since, last_fp = time.monotonic(), probe["fp"]
            elif time.monotonic() - stable_since >= settle:
                break
        else:
            raise TimeoutError(f"{page_url} did not render the graph within {timeout:.0f}s: {probe}")
        shot = browser.send("Page.captureScreenshot", {"format": "png"})
        out.write_bytes(base64.b64decode(shot["data"]))
        return probe
    finally:
        browser.close()


# --------------------------------------------------------------------------------------------- main


def group_route(group: str) -> str:
    return f"/locations/{REPOSITORY}@{LOCATION}/asset-groups/{group}"


def global_route(groups: list[str]) -> str:
    """``/asset-groups`` with every group box expanded (``?expanded=`` takes the UI's group ids:
    ``global@global:<group>``, or ``<repo>@<location>:<group>`` behind the per-location feature flag; unknown
    ids are ignored)."""
    ids = [f"global@global:{g}" for g in groups] + [f"{REPOSITORY}@{LOCATION}:{g}" for g in groups]
    return "/asset-groups?expanded=" + urllib.parse.quote(",".join(ids), safe="@:,")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running Dagster UI (e.g. http://127.0.0.1:3000); default: start one")
    ap.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "docs" / "lineage.png", help="global lineage PNG"
    )
    ap.add_argument(
        "--group",
        action="append",
        dest="groups",
        help="also screenshot this asset group to docs/lineage_<group>.png (repeatable; default: every "
        "family)",
    )
    ap.add_argument("--no-groups", action="store_true", help="only the global lineage page")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--group-height", type=int, default=700, help="window height for the group pages")
    ap.add_argument(
        "--scale", type=float, default=2.0, help="device pixel ratio (2: PNG twice the window size)"
    )
    ap.add_argument(
        "--timeout", type=float, default=150, help="seconds to wait for the webserver and each page"
    )
    args = ap.parse_args(argv)

    server = Webserver(url=args.url.rstrip("/")) if args.url else None
    try:
        if server is None:
            print("starting dagster-webserver -w workspace.yaml ...", flush=True)
            server = start_webserver(timeout=args.timeout)
            print(
                f"webserver ready at {server.url} ({time.monotonic() - server.started_at:.0f}s)", flush=True
            )
        else:
            wait_until_loaded(server, timeout=args.timeout)

        nodes = graphql(server.url, "{ assetNodes { assetKey { path } groupName } }")["assetNodes"]
        by_group: dict[str, list[str]] = {}
        for n in nodes:
            by_group.setdefault(n["groupName"], []).append(n["assetKey"]["path"][-1])
        names = sorted({name for names in by_group.values() for name in names})

        route = global_route(sorted(by_group))
        probe = capture(
            f"{server.url}{route}", args.out, names, args.width, args.height, args.scale, args.timeout
        )
        print(f"wrote {args.out} ({server.url}{route}, {probe.get('nodes')} nodes)")

        groups = [] if args.no_groups else (args.groups or sorted(g for g in by_group if g != "default"))
        for group in groups:
            out = args.out.with_name(f"{args.out.stem}_{group}.png")
            route = group_route(group)
            expect = sorted(set(by_group.get(group, [])))
            probe = capture(
                f"{server.url}{route}", out, expect, args.width, args.group_height, args.scale, args.timeout
            )
            print(f"wrote {out} ({server.url}{route}, {probe.get('nodes')} nodes)")
    finally:
        if server is not None and server.proc is not None:
            stop_webserver(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
