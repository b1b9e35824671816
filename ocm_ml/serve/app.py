"""FastAPI apps of the endpoints (DESIGN.md, "Endpoints"), one factory for both families.

The app does HTTP, validation and the response shape; a *backend* owns the model and does inference.
The Ray Serve deployments (:mod:`ocm_ml.serve.deployments`) and the naive baseline server
(:mod:`ocm_ml.serve.naive`) are two backends of the same app, so both answer exactly the same contract.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from ocm_ml.serve.loading import ModelBundle
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
from ocm_ml.serve.validation import InputError, Limits, parse_json_body, validate_images, validate_texts

SERVICE_VERSION = "1.0.0"
SERVICE_NAMES = {"image": "fashion-mnist-classifier", "text": "tweet-sentiment-classifier"}


class Backend(Protocol):
    """What the app needs from whoever holds the model."""

    kind: str
    started_at: float  # time.monotonic() at start
    limits: Limits
    bundle: ModelBundle | None
    last_reload_error: str | None

    async def infer(self, inputs: Any) -> tuple[ModelBundle, Any, Any]:
        """Validated inputs → (bundle that answered, labels or class ids, confidences)."""
        ...

    def serving_info(self) -> dict[str, Any]:
        """Batching and limits in effect, for /info."""
        ...


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def _error(status_code: int, detail: str) -> Response:
    return _json({"detail": detail}, status_code=status_code)


def _request_body_doc(model: type) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


_ERRORS = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
    413: {"model": ErrorResponse, "description": "The body is larger than the service accepts."},
    415: {"model": ErrorResponse, "description": "The body is not JSON."},
    422: {"model": ErrorResponse, "description": "The JSON does not match the contract; detail says where."},
    503: {"model": ErrorResponse, "description": "No model is loaded yet."},
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
        return _error(exc.status_code, exc.message)

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
            "last_reload_error": backend.last_reload_error,
            **(backend.health_details() if hasattr(backend, "health_details") else {}),
        }
        return _json(body, status_code=200 if bundle is not None else 503)

    @app.get("/info", response_model=InfoResponse, responses={503: _ERRORS[503]}, summary="Model lineage")
    async def info() -> Response:
        bundle = backend.bundle
        if bundle is None:
            return _error(503, backend.last_reload_error or "no model is loaded yet")
        return _json({**bundle.describe(), "serving": backend.serving_info()})

    async def _read(request: Request) -> tuple[dict[str, Any], bytes]:
        body = await request.body()
        return parse_json_body(body, request.headers.get("content-type"), backend.limits), body

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
                return _error(503, backend.last_reload_error or "no model is loaded yet")
            bundle, ids, confs = await backend.infer(pixels)
            classes = bundle.classes
            predictions = [
                {"class_id": int(i), "class_name": classes[i], "confidence": float(c)}
                for i, c in zip(ids.tolist(), confs.tolist(), strict=True)
            ]
            return _json(
                {
                    "predictions": predictions,
                    "model_uri": bundle.model_uri,
                    "data_version": bundle.data_version,
                    "timestamp": datetime.now(UTC).isoformat(),
                    "processing_time_ms": round((time.perf_counter() - started) * 1000, 3),
                }
            )

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
                return _error(503, backend.last_reload_error or "no model is loaded yet")
            bundle, labels, confs = await backend.infer(texts)
            predictions = [
                {"text": t, "label": label, "confidence": float(c)}
                for t, label, c in zip(texts, labels, confs, strict=True)
            ]
            return _json(
                {"predictions": predictions, "model_uri": bundle.model_uri, "data_version": bundle.data_version}
            )

    return app
