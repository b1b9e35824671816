"""Pydantic models of the endpoint contract (DESIGN.md, "Endpoints").

Request models document the bodies in OpenAPI; the bodies themselves are parsed by
:mod:`ocm_ml.serve.validation` (numpy, vectorised) so that every malformed input gets a precise 4xx.
Response models are what the routes return.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

IMAGE_SIDE = 28
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE

Pixel = float
FlatImage = list[Pixel]
SquareImage = list[list[Pixel]]


class ImagePredictRequest(BaseModel):
    """``{"images": [...]}``: each image 784 pixel values or 28 rows of 28, numbers in 0–255."""

    model_config = ConfigDict(extra="forbid")

    images: list[FlatImage | SquareImage] = Field(
        min_length=1,
        description=(
            "Images to classify: each a flat list of 784 numbers or 28 lists of 28 numbers, "
            "pixel values in 0-255 (finite numbers; booleans, strings and null are rejected). "
            "At most the service's max_batch images."
        ),
        json_schema_extra={
            "items": {
                "anyOf": [
                    {
                        "type": "array",
                        "items": {"type": "number", "minimum": 0, "maximum": 255},
                        "minItems": IMAGE_PIXELS,
                        "maxItems": IMAGE_PIXELS,
                    },
                    {
                        "type": "array",
                        "items": {
                            "type": "array",
                            "items": {"type": "number", "minimum": 0, "maximum": 255},
                            "minItems": IMAGE_SIDE,
                            "maxItems": IMAGE_SIDE,
                        },
                        "minItems": IMAGE_SIDE,
                        "maxItems": IMAGE_SIDE,
                    },
                ]
            }
        },
    )


class TextPredictRequest(BaseModel):
    """``{"texts": ["…"]}``: non-empty strings."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(
        min_length=1,
        description="Texts to classify: non-empty strings, at most max_batch of them, each at most "
        "max_text_length characters.",
        json_schema_extra={"items": {"type": "string", "minLength": 1}},
    )


class ImagePrediction(BaseModel):
    class_id: int
    class_name: str
    confidence: float


class ImagePredictResponse(BaseModel):
    predictions: list[ImagePrediction]
    model_uri: str
    data_version: str | None
    timestamp: str = Field(description="UTC time the answer was produced, ISO 8601.")
    processing_time_ms: float


class TextPrediction(BaseModel):
    text: str
    label: str
    confidence: float


class TextPredictResponse(BaseModel):
    predictions: list[TextPrediction]
    model_uri: str
    data_version: str | None


class RootResponse(BaseModel):
    service: str
    version: str
    status: str
    docs: str
    health: str


class HealthResponse(BaseModel):
    status: str = Field(description='"healthy", or "unavailable" (HTTP 503) while no model is loaded.')
    model_loaded: bool
    model_uri: str | None
    uptime_seconds: float
    last_reload_error: str | None = Field(
        None, description="Why the last reload failed (the old model still serves).")
    replica_id: str | None = None
    model_version: str | None = None
    data_version: str | None = None
    config_revision: str | None = Field(None, description="Hash of the user_config this replica runs.")
    failed_revision: str | None = Field(None, description="Hash of the last user_config it rejected.")


class NormalizationParams(BaseModel):
    mean: float
    std: float


class InfoResponse(BaseModel):
    """What the endpoint serves and where it came from. Family-specific fields are ``None`` otherwise."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    kind: str
    model_uri: str
    model_name: str | None = None
    model_version: str | None = Field(
        None, description="Registered model version, when served from the registry.")
    run_id: str | None = None
    data_version: str | None = Field(None, description="DVC registry tag the model was trained on.")
    dataset: str | None = None
    dvc_commit: str | None = None
    training_time: str | None = Field(None, description="Start time of the MLflow training run, ISO 8601.")
    dagster_run_id: str | None = None
    normalization_params: NormalizationParams | None = None
    output_classes: list[str] | None = None
    label_map: dict[str, str] | None = None
    metadata_md5: str | None = Field(
        None, description="md5 of the metadata.json the preprocessing came from.")
    run_tags: dict[str, str] = Field(default_factory=dict)
    loaded_at: str | None = None
    serving: dict[str, Any] = Field(default_factory=dict, description="Batching and limits in effect.")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong with the request.")
