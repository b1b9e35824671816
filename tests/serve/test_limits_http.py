"""Serving under abuse, over real HTTP on the session's real Serve (proxy and direct ingress):

- an oversized body is refused with 413 before it is read whole: by its Content-Length (the rest is never
  sent) and, for a chunked body without one, as soon as the stream passes the cap;
- a full queue answers 503 with Retry-After: Serve's (``max_queued_requests``) and the adaptive batcher's
  (``max_queued_items``);
- a failing challenger answers only for itself: the champion's requests never fail, the challenger's are
  answered by the champion and counted for the canary judge; in shadow mode nothing changes;
- no credential reaches /health, /info, the Serve config or the Ray logs.
"""

from __future__ import annotations

import json
import select
import socket
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.serve.conftest import TEST_ACTOR_OPTIONS, TEXT_APP, TEXT_MODEL, wait_healthy

LIMITS_APP = "serve_tests_limits"
FLAKY_MODEL = "test.tweet-sentiment-flaky"
SECRET = "FAKE-SECRET-7f3a9c"
LOOKUP_URL = f"https://ocm-reader:{SECRET}@lookup.example.com/v1"
VOCABULARY_URL = f"https://ocm-reader:{SECRET}@vocab.example.com/v1.txt"
CHAMPION = f"models:/{TEXT_MODEL}/1"
RETRY_AFTER_S = 2

# A text model that answers "neutral", raises on texts with "boom" (naming a URL with credentials, as a
# client library would) and, given a vocabulary_url, fails to load (naming it too).
FLAKY_PYFUNC = textwrap.dedent(
    '''
    import mlflow
    import pandas as pd


    class Flaky(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            config = context.model_config or {}
            if config.get("vocabulary_url"):
                raise RuntimeError(f"cannot fetch the vocabulary from {config['vocabulary_url']}: refused")
            self.lookup_url = config.get("lookup_url", "")

        def predict(self, context, model_input, params=None):
            texts = list(model_input["text"])
            if any("boom" in t for t in texts):
                raise RuntimeError(f"challenger exploded: lookup {self.lookup_url} refused")
            return pd.DataFrame({"label_id": [1] * len(texts), "confidence": [0.5] * len(texts)})


    mlflow.models.set_model(Flaky())
    '''
)


@pytest.fixture(scope="module")
def flaky_models(serve_env) -> dict[str, str]:
    """Version 1: loads, fails on "boom"; version 2: fails to load. Same data version as the text model."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(serve_env.tracking_uri)
    mlflow.set_registry_uri(serve_env.tracking_uri)
    client = MlflowClient(tracking_uri=serve_env.tracking_uri, registry_uri=serve_env.tracking_uri)
    champion_run = client.get_run(client.get_model_version(TEXT_MODEL, "1").run_id)
    tags = {k: champion_run.data.tags[k] for k in ("dvc_data_version", "dvc_commit")}
    code = serve_env.root / "flaky_pyfunc.py"
    code.write_text(FLAKY_PYFUNC)
    for name, model_config in (("flaky", {"lookup_url": LOOKUP_URL}),
                               ("leaky", {"vocabulary_url": VOCABULARY_URL})):
        with mlflow.start_run(run_name=f"text-{name}", experiment_id=champion_run.info.experiment_id):
            mlflow.set_tags(tags)
            mlflow.pyfunc.log_model(name="model", python_model=str(code), model_config=model_config,
                                    registered_model_name=FLAKY_MODEL, pip_requirements=["pandas"])
    return {"flaky": f"models:/{FLAKY_MODEL}/1", "leaky": f"models:/{FLAKY_MODEL}/2"}


@pytest.fixture(scope="module")
def limits_url(serve_http, serve_env):
    """A text app that holds one request at a time and queues one more; each request waits 1.5 s for its
    batch to fill, so a third concurrent request finds the queue full."""
    from ocm_ml.serve.deployments import build_app
    from tests.serve.conftest import deploy

    deploy(build_app("text", serve_env.user_config("text", CHAMPION, max_batch=16, max_text_length=50,
                                                   batch_wait_timeout_s=1.5),
                     max_ongoing_requests=1, max_queued_requests=1, retry_after_s=RETRY_AFTER_S,
                     ray_actor_options=TEST_ACTOR_OPTIONS), LIMITS_APP)
    url = f"{serve_http}/{LIMITS_APP}"
    wait_healthy(url)
    yield url
    from ray import serve

    serve.delete(LIMITS_APP)


def _both_paths(name: str, proxy_url: str) -> list[str]:
    from ocm_resources.serve_control import ServeControl

    direct = ServeControl(address=None).urls(name)["direct"]
    assert direct, "the session Serve runs direct ingress: each replica has its own port"
    return [proxy_url, direct[0]]


# --- raw HTTP, so that the test controls how much of the body is ever sent --------------------------------


def _open(url: str, headers: dict[str, str], path: str = "/predict") -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = [f"POST {parts.path}{path} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}",
            *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    sock.sendall("\r\n".join(head).encode())
    return sock


def _read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed): reads until the server closes the connection or ``timeout``."""
    sock.settimeout(timeout)
    data, closed = b"", False
    try:
        while chunk := sock.recv(65536):
            data += chunk
        closed = True
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":  # one chunk is all a JSON error needs
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return status, headers, body, closed


def test_content_length_over_the_cap_is_refused_before_the_body_is_sent(text_url):
    info = httpx.get(f"{text_url}/info", timeout=30).json()["serving"]
    cap = info["max_body_bytes"]
    assert cap < 200_000  # derived from this app's max_batch=16 x max_text_length=50, not 64 MiB
    for url in _both_paths(TEXT_APP, text_url):
        sock = _open(url, {"Content-Type": "application/json", "Content-Length": str(10 * cap)})
        sock.sendall(b'{"texts": ["' + b"a" * 1000)  # and never the rest: any answer came before the body
        status, headers, body, closed = _read_response(sock, timeout=10 if url != text_url else 3)
        sock.close()
        assert status == 413, (url, status, body)
        detail = json.loads(body)["detail"]
        assert str(cap) in detail and str(10 * cap) in detail and "split the batch" in detail
        assert headers.get("connection") == "close"
        # The replica's own port closes at once. The contract port is HAProxy (docs/performance.md), which
        # answers the same 413 at once but drains the announced body before it closes (its design); the
        # replica is done with the request either way, so the close is asserted where ocm controls it.
        assert closed or url == text_url, url


def test_a_chunked_body_is_cut_off_once_it_passes_the_cap(text_url):
    cap = httpx.get(f"{text_url}/info", timeout=30).json()["serving"]["max_body_bytes"]
    chunk = b"a" * 8192
    for url in _both_paths(TEXT_APP, text_url):
        sock = _open(url, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        sent, answered = 0, False
        try:
            sock.sendall(b'c\r\n{"texts": ["\r\n')
            while sent < 10 * cap:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                if select.select([sock], [], [], 0.02)[0]:  # the server answered: stop sending
                    answered = True
                    break
        except (BrokenPipeError, ConnectionResetError):
            answered = True
        status, headers, body, closed = _read_response(sock)
        sock.close()
        assert answered and status == 413, (url, status, body)
        assert sent < 10 * cap  # answered while the client was still sending
        assert "still coming" in json.loads(body)["detail"]
        assert closed or url == text_url, url  # HAProxy drains before it closes (see the test above)


def _post_concurrently(url: str, n: int, texts: list[str]) -> list[httpx.Response]:
    """``n`` requests released together; the responses in the order they came back."""
    barrier = threading.Barrier(n)
    answered: list[httpx.Response] = []
    lock = threading.Lock()

    def one(_):
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            response = client.post(f"{url}/predict", json={"texts": texts})
        with lock:
            answered.append(response)

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    return answered


def test_a_full_serve_queue_answers_503_with_retry_after(limits_url):
    """Checks the codes, the Retry-After header, and that the refused requests were answered while admitted
    ones were still being served (the last answer is a 200: a 503 never waited for the line to clear)."""
    for url in _both_paths(LIMITS_APP, limits_url):
        responses = _post_concurrently(url, 5, ["good day"])
        assert responses[-1].status_code == 200, (url, [r.status_code for r in responses])
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 1 and codes.count(503) >= 2 and set(codes) <= {200, 503}, (url, codes)
        for r in responses:
            if r.status_code == 503:
                assert r.headers.get("retry-after") == str(RETRY_AFTER_S), (url, r.headers)
            else:
                assert r.json()["predictions"][0]["label"] == "positive"


def test_a_full_batcher_queue_answers_503_with_retry_after(text_url):
    from tests.serve.conftest import reconfigure

    reconfigure(TEXT_APP, {"batch_wait_timeout_s": 1.5, "max_queued_items": 2})
    try:
        responses = _post_concurrently(text_url, 5, ["good day"])
        stats = httpx.get(f"{text_url}/info", timeout=30).json()["serving"]
    finally:
        reconfigure(TEXT_APP, {"batch_wait_timeout_s": 0.0, "max_queued_items": None})
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 2 and codes.count(503) == 3, codes  # two wait for the batch, three refused
    for r in responses:
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "1"
            assert "overloaded" in r.json()["detail"] and "at most 2 may wait" in r.json()["detail"]
    assert stats["max_queued_items"] == 2 and stats["batches"]["rejected"] >= 3


def _predict_many(url: str, texts: list[str], workers: int = 8) -> list[httpx.Response]:
    def one(text):
        with httpx.Client(timeout=30) as client:
            return client.post(f"{url}/predict", json={"texts": [text]})

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, texts))


def _challenger(url: str) -> dict:
    return httpx.get(f"{url}/info", timeout=30).json()["serving"]["challenger"]


def test_a_failing_challenger_answers_only_for_itself(text_url, flaky_models):
    from tests.serve.conftest import reconfigure

    flaky = flaky_models["flaky"]
    # One at a time first (the challenger answers some), then concurrently: batches of a few requests
    # each, mixing champion- and challenger-routed ones, with and without "boom".
    serial, mixed = ["fine good"] * 20, ["boom good", "fine good"] * 30
    texts = serial + mixed
    try:
        reconfigure(TEXT_APP, {"challenger_uri": flaky, "challenger_mode": "canary", "challenger_share": 0.5,
                               "batch_wait_timeout_s": 0.02})
        responses = _predict_many(text_url, serial, workers=1) + _predict_many(text_url, mixed)
        stats = _challenger(text_url)
        assert [r.status_code for r in responses] == [200] * len(texts), [r.text for r in responses][:3]
        answered_by = {CHAMPION: 0, flaky: 0}
        for text, r in zip(texts, responses, strict=True):
            body = r.json()
            answered_by[body["model_uri"]] += 1
            label = body["predictions"][0]["label"]
            assert label == ("neutral" if body["model_uri"] == flaky else "positive"), body
            if "boom" in text:
                assert body["model_uri"] == CHAMPION  # the challenger never answers what it failed on
        assert stats["champion_errors"] == 0 and stats["canary_errors"] >= 1
        assert stats["canary_fallbacks"] == stats["canary_errors"]
        # Every challenger-routed request either got the challenger's answer or is counted as its error.
        assert stats["canary_requests"] - stats["canary_errors"] == answered_by[flaky] >= 1
        assert stats["champion_requests"] + stats["canary_requests"] == len(texts)
        assert ("challenger exploded" in stats["canary_last_error"]
                and SECRET not in stats["canary_last_error"])

        reconfigure(TEXT_APP, {"challenger_mode": "shadow"})
        responses = _predict_many(text_url, ["boom good"] * 10)
        assert {(r.status_code, r.json()["model_uri"], r.json()["predictions"][0]["label"])
                for r in responses} == {(200, CHAMPION, "positive")}
        deadline = time.monotonic() + 30
        while (stats := _challenger(text_url))["shadow_errors"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stats["shadow_errors"] >= 1 and "challenger exploded" in stats["shadow_last_error"]
    finally:
        reconfigure(TEXT_APP, {"challenger_uri": None, "challenger_mode": "canary", "challenger_share": 0.0,
                               "batch_wait_timeout_s": 0.0})


def _ray_logs_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())  # noqa: SLF001 - the session's own logs


def _grep(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue
    return hits


def test_no_credential_reaches_health_info_serve_config_or_logs(text_url, serve_env, flaky_models):
    from ray import serve
    from ray.serve.context import _get_global_client

    from ocm_ml.serve.deployments import config_hash
    from ocm_resources.serve_control import ReloadError, ServeControl
    from tests.serve.conftest import reconfigure

    # 1. URIs with credentials never reach Serve: refused on the driver, with the secret redacted.
    for key, uri in (("tracking_uri", f"https://ocm:{SECRET}@mlflow.example.com"),
                     ("registry_url", f"https://oauth2:{SECRET}@git.example.com/data/registry.git"),
                     ("registry_uri", f"https://{SECRET}@mlflow.example.com")):
        with pytest.raises(ValueError) as info:
            reconfigure(TEXT_APP, {key: uri})
        assert SECRET not in str(info.value) and "MLFLOW_TRACKING_TOKEN" in str(info.value)

    # 2. A load that fails with a URL with credentials in its message: rejected, the old model serves on.
    with pytest.raises(ReloadError) as info:
        reconfigure(TEXT_APP, {"model_uri": flaky_models["leaky"]}, timeout_s=120)
    assert SECRET not in str(info.value) and "https://***@vocab.example.com" in str(info.value)
    # The same failure as /health shows it while it stands (reconfigure above rolled the config back).
    from ocm_ml.serve.deployments import build_app
    from tests.serve.conftest import deploy

    deployed = ServeControl(address=None).deployed(TEXT_APP)
    good = deployed["user_config"]
    leaky = {**good, "model_uri": flaky_models["leaky"]}
    version = deployed["code_version"]
    deploy(build_app("text", leaky, ray_actor_options=TEST_ACTOR_OPTIONS, version=version), TEXT_APP)
    try:
        deadline = time.monotonic() + 120
        while (health := httpx.get(f"{text_url}/health", timeout=30).json()).get("failed_revision") \
                != config_hash(leaky) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert "https://***@vocab.example.com" in health["last_reload_error"]
        # 3. A challenger failing with a URL with credentials in its message, in canary and in shadow.
        deploy(build_app("text", {**good, "challenger_uri": flaky_models["flaky"], "challenger_share": 1.0},
                         ray_actor_options=TEST_ACTOR_OPTIONS, version=version), TEXT_APP)
        deadline = time.monotonic() + 60
        while "challenger" not in httpx.get(f"{text_url}/info", timeout=30).json()["serving"] \
                and time.monotonic() < deadline:
            time.sleep(0.25)
        assert {r.status_code for r in _predict_many(text_url, ["boom"] * 4)} == {200}
        info_text = httpx.get(f"{text_url}/info", timeout=30).text
        assert "lookup https://***@lookup.example.com" in info_text
        bodies = [info_text, httpx.get(f"{text_url}/health", timeout=30).text,
                  httpx.get(text_url, timeout=30).text]
    finally:
        deploy(build_app("text", good, ray_actor_options=TEST_ACTOR_OPTIONS, version=version), TEXT_APP)
        wait_healthy(text_url)

    # The grep: HTTP bodies, Serve's status and config (what the dashboard shows), every Ray log file.
    serve_config = json.dumps(_get_global_client().get_serve_details(), default=str) + str(serve.status())
    for text in (*bodies, serve_config):
        assert SECRET not in text
    assert CHAMPION in serve_config  # the grep looked where the user_config is
    logs = _ray_logs_dir()
    time.sleep(1.0)  # let the replica's log handler write the last lines
    assert _grep(logs, SECRET.encode()) == []
    assert _grep(logs, b"https://***@vocab.example.com"), "the rejected reload was logged (redacted)"


def test_a_first_load_failure_raises_without_the_credential(serve_env, flaky_models):
    """With no model loaded yet the replica's reconfigure raises (Serve shows and logs the text): a new
    exception with the URL redacted and no chained original."""
    import asyncio
    import traceback

    from ocm_ml.serve.deployments import _Classifier

    class Replica(_Classifier):
        kind = "text"

    replica = Replica()
    with pytest.raises(Exception) as info:
        asyncio.run(replica.reconfigure(serve_env.user_config("text", flaky_models["leaky"])))
    shown = "".join(traceback.format_exception(info.value))
    assert "https://***@vocab.example.com" in shown and SECRET not in shown
    assert info.value.__cause__ is None and info.value.__context__ is None
