"""FastAPI apps of the endpoints (DESIGN.md, "Endpoints"), one factory for both families.

The app does HTTP, validation and the response shape; a *backend* owns the model and does inference.
The Ray Serve deployments (:mod:`ocm_ml.serve.deployments`) and the naive baseline server
(:mod:`ocm_ml.serve.naive`) are two backends of the same app, so both answer exactly the same contract.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from ocm_ml.serve.batching import QueueFull
from ocm_ml.serve.loading import ImageBundle, ModelBundle
from ocm_ml.serve.schemas import (
    ErrorResponse,
    HealthResponse,
    ImagePredictRequest,
    ImagePredictResponse,
    InfoResponse,
    RootResponse,
    TextPredictRequest,
    TextPredictResponse,
)
from ocm_ml.serve.validation import (
    InputError,
    Limits,
    body_too_large,
    check_content_length,
    check_content_type,
    parse_json_body,
    redact_credentials,
    validate_images,
    validate_texts,
)

logger = logging.getLogger("ray.serve")

SERVICE_VERSION = "1.0.0"
SERVICE_NAMES = {"image": "fashion-mnist-classifier", "text": "tweet-sentiment-classifier"}


class Backend(Protocol):
    """What the app needs from whoever holds the model (read-only here: the backend swaps them). A backend
    may also have ``health_details() -> dict`` for extra /health fields (the Ray deployments do)."""

    @property
    def kind(self) -> str: ...

    @property
    def started_at(self) -> float:
        """time.monotonic() at start."""
        ...

    @property
    def limits(self) -> Limits: ...

    @property
    def bundle(self) -> ModelBundle | None: ...

    @property
    def last_reload_error(self) -> str | None: ...

    async def infer(self, inputs: Any) -> tuple[ModelBundle, Any, Any]:
        """Validated inputs → (bundle that answered, labels or class ids, confidences)."""
        ...

    def serving_info(self) -> dict[str, Any]:
        """Batching and limits in effect, for /info."""
        ...


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def _request_id_only(request_id: str | None, *_: Any) -> str:
    return request_id or uuid.uuid4().hex


def _with_request_id(response: Response, echo: bool, request_id: str) -> Response:
    """``X-Request-Id`` on the answer, unless the server in front already sets it (Ray Serve's
    RequestIdMiddleware, in its proxy and in direct ingress, puts an id on every request that has none
    and echoes it on the response)."""
    if echo:
        response.headers["X-Request-Id"] = request_id
    return response


def _error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    response = _json({"detail": detail}, status_code=status_code)
    if headers:
        response.headers.update(headers)
    return response


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, refused with a 413 as soon as it is known to be over ``limits.max_body_bytes``:
    by its Content-Length before any of it is read, else (chunked, or a wrong Content-Length) once the
    bytes streamed so far pass the cap. Content-Type is checked first, from the headers too."""
    headers = request.headers
    check_content_type(headers.get("content-type"))
    check_content_length(headers.get("content-length"), limits)
    cap = limits.max_body_bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise body_too_large(limits, size=size)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _request_body_doc(model: type) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


_ERRORS = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
    413: {"model": ErrorResponse, "description": "The body is larger than the service accepts (refused from "
          "Content-Length, or as soon as the streamed body passes the cap)."},
    415: {"model": ErrorResponse, "description": "The body is not JSON."},
    422: {"model": ErrorResponse, "description": "The JSON does not match the contract; detail says where."},
    503: {"model": ErrorResponse, "description": "No model is loaded yet, or the replica is overloaded "
          "(then with a Retry-After header)."},
}


def create_app(backend: Backend, *, title: str | None = None) -> FastAPI:
    """The endpoint's FastAPI app for ``backend.kind`` ("image" or "text")."""
    kind = backend.kind
    service = title or SERVICE_NAMES[kind]
    app = FastAPI(
        title=service,
        version=SERVICE_VERSION,
        description=(
            "Classifies Fashion-MNIST images (28x28, pixel values 0-255)."
            if kind == "image"
            else "Classifies the sentiment of short texts."
        ),
    )

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> Response:
        return _error(exc.status_code, exc.message, exc.headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> Response:
        return _error(503, exc.message, {"Retry-After": str(exc.retry_after_s)})

    # The prediction log and request id (one call per answered request); a backend without a log (the
    # naive baseline) still answers with a request id.
    log_prediction = getattr(backend, "log_prediction", None) or _request_id_only
    echo_request_id = not getattr(backend, "server_sets_request_id", False)

    def _not_loaded() -> Response:
        return _error(503, redact_credentials(backend.last_reload_error) or "no model is loaded yet")

    async def _infer(inputs: Any) -> tuple[ModelBundle, Any, Any] | Response:
        """The backend's answer, or a 500 whose body says nothing internal; the reason goes to the log
        with any URL credentials redacted."""
        try:
            return await backend.infer(inputs)
        except (InputError, QueueFull):
            raise
        except Exception as exc:
            logger.error("inference failed: %s", redact_credentials(f"{type(exc).__name__}: {exc}"))
            return _error(500, "the model failed on this request; the replica's log has the reason")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return _error(422, "; ".join(parts) or "invalid request")

    @app.get("/", response_model=RootResponse, summary="What this service is")
    async def root(request: Request) -> dict[str, Any]:
        base = request.scope.get("root_path", "").rstrip("/")
        return {
            "service": service,
            "version": SERVICE_VERSION,
            "status": "running" if backend.bundle is not None else "starting",
            "docs": f"{base}/docs",
            "health": f"{base}/health",
        }

    @app.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "No model is loaded."}},
        summary="Liveness and the model being served",
    )
    async def health() -> Response:
        bundle = backend.bundle
        body = {
            "status": "healthy" if bundle is not None else "unavailable",
            "model_loaded": bundle is not None,
            "model_uri": bundle.model_uri if bundle is not None else None,
            "uptime_seconds": round(time.monotonic() - backend.started_at, 3),
            "last_reload_error": redact_credentials(backend.last_reload_error),
            **(details() if (details := getattr(backend, "health_details", None)) is not None else {}),
        }
        return _json(body, status_code=200 if bundle is not None else 503)

    @app.get("/info", response_model=InfoResponse, responses={503: _ERRORS[503]}, summary="Model lineage")
    async def info() -> Response:
        bundle = backend.bundle
        if bundle is None:
            return _not_loaded()
        return _json({**bundle.describe(), "serving": backend.serving_info()})

    async def _read(request: Request) -> tuple[dict[str, Any], bytes]:
        limits = backend.limits
        body = await read_body(request, limits)
        return parse_json_body(body, None, limits), body

    if kind == "image":

        @app.post(
            "/predict",
            response_model=None,
            responses={200: {"model": ImagePredictResponse}, **_ERRORS},
            openapi_extra=_request_body_doc(ImagePredictRequest),
            summary="Classify images",
        )
        async def predict_images(request: Request) -> Response:
            started = time.perf_counter()
            payload, body = await _read(request)
            pixels = validate_images(payload, backend.limits, raw=body)
            if backend.bundle is None:
                return _not_loaded()
            answer = await _infer(pixels)
            if isinstance(answer, Response):
                return answer
            bundle, ids, confs = answer
            classes = cast(ImageBundle, bundle).classes  # the image app is built around image bundles only
            predictions = [
                {"class_id": int(i), "class_name": classes[i], "confidence": float(c)}
                for i, c in zip(ids.tolist(), confs.tolist(), strict=True)
            ]
            request_id = log_prediction(request.headers.get("x-request-id"), pixels, bundle,
                                        [p["class_name"] for p in predictions], confs, ids)
            return _with_request_id(_json(
                {
                    "predictions": predictions,
                    "model_uri": bundle.model_uri,
                    "data_version": bundle.data_version,
                    "timestamp": datetime.now(UTC).isoformat(),
                    "processing_time_ms": round((time.perf_counter() - started) * 1000, 3),
                }
            ), echo_request_id, request_id)

    else:

        @app.post(
            "/predict",
            response_model=None,
            responses={200: {"model": TextPredictResponse}, **_ERRORS},
            openapi_extra=_request_body_doc(TextPredictRequest),
            summary="Classify texts",
        )
        async def predict_texts(request: Request) -> Response:
            payload, _ = await _read(request)
            texts = validate_texts(payload, backend.limits)
            if backend.bundle is None:
                return _not_loaded()
            answer = await _infer(texts)
            if isinstance(answer, Response):
                return answer
            bundle, labels, confs = answer
            predictions = [
                {"text": t, "label": label, "confidence": float(c)}
                for t, label, c in zip(texts, labels, confs, strict=True)
            ]
            request_id = log_prediction(request.headers.get("x-request-id"), texts, bundle, labels, confs)
            return _with_request_id(_json(
                {"predictions": predictions, "model_uri": bundle.model_uri,
                 "data_version": bundle.data_version}
            ), echo_request_id, request_id)

    return app
