"""Request validation for the endpoints: every malformed input becomes an :class:`InputError` (a 4xx with a
message that says what was wrong), never a 5xx.

The fast path is vectorised: one ``np.asarray`` over the whole batch, then shape, finiteness and range
checks on the array. Only when that fails does a slow walk over the Python values find the first culprit
to name it (``images[3][17] is a string ('12')``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from ocm_ml.serve.schemas import IMAGE_PIXELS, IMAGE_SIDE

DEFAULT_MAX_BATCH = 1000
DEFAULT_MAX_TEXT_LENGTH = 2000
PIXEL_MIN, PIXEL_MAX = 0.0, 255.0

# The body cap is derived from the largest legal request (see default_max_body_bytes).
#: Bytes of one pixel value in the JSON of a request: "255, " is 5 (json.dumps' default separators, what
#: requests' ``json=`` sends), one more for a decimal such as "12.5,". Longer floats (full-precision
#: values) fit fewer images per request; the 413 says so.
JSON_PIXEL_BYTES = 6
#: Bytes of one character of a text in JSON at worst: escaped as ``\uXXXX``.
JSON_CHAR_BYTES = 6
#: Room for the field name, brackets and whitespace a client may add.
BODY_SLACK_BYTES = 64 * 1024


def default_max_body_bytes(kind: str, max_batch: int, max_text_length: int = DEFAULT_MAX_TEXT_LENGTH) -> int:
    """The body cap for ``max_batch`` items: the largest legal request plus slack (images: 784 values of
    :data:`JSON_PIXEL_BYTES` each, in 28 rows; texts: ``max_text_length`` characters escaped)."""
    if kind == "text":
        per_item = max_text_length * JSON_CHAR_BYTES + 8  # quotes, comma, space
    else:
        per_item = IMAGE_PIXELS * JSON_PIXEL_BYTES + IMAGE_SIDE * 4 + 8  # row brackets and separators
    return max_batch * per_item + BODY_SLACK_BYTES


DEFAULT_MAX_BODY_BYTES = default_max_body_bytes("image", DEFAULT_MAX_BATCH)


class InputError(ValueError):
    """A client error: ``status_code`` is a 4xx, ``message`` says what was wrong and how to fix it;
    ``headers`` go into the response (e.g. ``Connection: close`` on a 413)."""

    def __init__(self, message: str, status_code: int = 422, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.headers = headers


# --- credentials in URLs --------------------------------------------------------------------------------

_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/@'\"<>]+@")


def redact_credentials(text: Any) -> Any:
    """``text`` with the user-info part of every URL in it (``https://user:token@host``) replaced by
    ``***``; anything that is not a string is returned as it is (``None`` stays ``None``)."""
    if not isinstance(text, str) or "@" not in text:
        return text
    return _USERINFO_RE.sub(r"\1***@", text)


def url_credentials(uri: str | None) -> bool:
    """Whether ``uri`` carries credentials in its user-info part: a password in any scheme, or any
    user-info in http(s) URLs (``https://<token>@host`` is how git and MLflow servers take tokens). A bare
    user name such as ``ssh://git@host`` or ``postgresql://user@host`` is not a credential."""
    if not uri or "@" not in uri:
        return False
    try:
        parts = urlsplit(uri)
        password, username = parts.password, parts.username
    except ValueError:  # unparseable: look for user-info by pattern
        return redact_credentials(uri) != uri
    if password:
        return True
    return bool(username) and "http" in parts.scheme.lower()


@dataclass(frozen=True)
class Limits:
    """Request limits of one endpoint (set through the deployment's user_config)."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_text_length: int = DEFAULT_MAX_TEXT_LENGTH
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_text_length", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Limits:
        return cls(
            max_batch=int(config.get("max_batch", DEFAULT_MAX_BATCH)),
            max_text_length=int(config.get("max_text_length", DEFAULT_MAX_TEXT_LENGTH)),
            max_body_bytes=int(config.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
        )


def _is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def check_content_type(content_type: str | None) -> None:
    """A missing Content-Type is accepted; any other than JSON is a 415."""
    if content_type and not _is_json_media_type(content_type):
        raise InputError(
            f"unsupported Content-Type {content_type!r}: send the body as JSON with "
            "'Content-Type: application/json'",
            status_code=415,
        )


def body_too_large(limits: Limits, size: int | None = None, declared: int | None = None) -> InputError:
    """The 413 for a body over ``limits.max_body_bytes``: by its Content-Length (``declared``, before any of
    it is read) or by the bytes received so far (``size``, while streaming). ``Connection: close`` tells
    the server not to read the rest of it."""
    what = (f"declares Content-Length {declared} bytes" if declared is not None
            else f"is over {size} bytes and still coming" if size is not None else "is too large")
    return InputError(
        f"request body {what}; this endpoint accepts at most {limits.max_body_bytes} bytes, which fits "
        f"max_batch={limits.max_batch} items per request in compact JSON: split the batch into several "
        "smaller requests (or round pixel values to integers); an operator can raise max_body_bytes",
        status_code=413,
        headers={"Connection": "close"},
    )


def check_content_length(content_length: str | None, limits: Limits) -> None:
    """Refuse a body by its declared size, before reading any of it (a 400 if the header is not a number)."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise InputError(f"Content-Length {content_length!r} is not a number", status_code=400) from None
    if declared > limits.max_body_bytes:
        raise body_too_large(limits, declared=declared)


def parse_json_body(body: bytes, content_type: str | None, limits: Limits = Limits()) -> dict[str, Any]:
    """Decode a request body that must be a JSON object.

    A missing Content-Type is accepted; any other than JSON is a 415. A body over the size limit is a 413
    (the app checks Content-Length and the streamed size before this, so that an oversized body is never
    read whole). Invalid JSON is a 400. ``NaN`` and ``Infinity`` (not JSON, but what Python's json writes)
    are a 422 naming the problem.
    """
    check_content_type(content_type)
    if len(body) > limits.max_body_bytes:
        raise body_too_large(limits, size=len(body))
    if not body.strip():
        raise InputError("request body is empty: send a JSON object", status_code=400)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if b"NaN" in body or b"Infinity" in body:
            raise InputError(
                "NaN and Infinity are not allowed: every value must be a finite number", status_code=422
            ) from None
        raise InputError(f"request body is not valid JSON: {exc}", status_code=400) from None
    if not isinstance(payload, dict):
        raise InputError(
            f"request body must be a JSON object, got {_describe(payload)}", status_code=422
        )
    return payload


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:17] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _take_field(payload: dict[str, Any], field: str) -> list[Any]:
    unexpected = sorted(k for k in payload if k != field)
    if field not in payload:
        hint = f" (got fields {unexpected})" if unexpected else ""
        raise InputError(f"missing field '{field}': send {{\"{field}\": [...]}}{hint}")
    if unexpected:
        raise InputError(f"unexpected field(s) {unexpected}: the body takes only '{field}'")
    value = payload[field]
    if not isinstance(value, list):
        raise InputError(f"'{field}' must be a list, got {_describe(value)}")
    if not value:
        raise InputError(f"'{field}' is empty: send at least one item")
    return value


def _check_count(field: str, n: int, limits: Limits) -> None:
    if n > limits.max_batch:
        raise InputError(
            f"'{field}' holds {n} items; at most {limits.max_batch} per request are allowed "
            "(split the batch into several requests)"
        )


# --- images ---------------------------------------------------------------------------------------------


def _bad_pixel(value: Any) -> str | None:
    """Why one pixel value is unacceptable, or None when it is fine."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"is {_describe(value)}; pixel values must be numbers in 0-255"
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {value!r}; pixel values must be finite numbers in 0-255"
    if not PIXEL_MIN <= value <= PIXEL_MAX:
        return f"is {value!r}, outside 0-255"
    return None


def _layout_error(i: int, image: Any) -> str | None:
    """Why image ``i`` has the wrong structure, or None when it is 784 values or 28 rows of 28."""
    where = f"images[{i}]"
    expected = f"each image must be {IMAGE_PIXELS} numbers or {IMAGE_SIDE} lists of {IMAGE_SIDE} numbers"
    if not isinstance(image, list):
        return f"{where} is {_describe(image)}; {expected}"
    if image and all(isinstance(row, list) for row in image):
        if len(image) != IMAGE_SIDE:
            return f"{where} has {len(image)} rows; {expected}"
        for r, row in enumerate(image):
            if len(row) != IMAGE_SIDE:
                return f"{where}[{r}] has {len(row)} values; {expected}"
            for c, v in enumerate(row):
                if isinstance(v, list | dict):
                    return f"{where}[{r}][{c}] is {_describe(v)}; {expected}"
        return None
    if any(isinstance(v, list) for v in image):
        return f"{where} mixes numbers and lists; {expected}"
    if len(image) != IMAGE_PIXELS:
        return f"{where} has {len(image)} values; {expected}"
    for j, v in enumerate(image):
        if isinstance(v, dict):
            return f"{where}[{j}] is {_describe(v)}; {expected}"
    return None


def _first_bad_value(i: int, image: list[Any]) -> str | None:
    if image and isinstance(image[0], list):
        for r, row in enumerate(image):
            for c, v in enumerate(row):
                if (why := _bad_pixel(v)) is not None:
                    return f"images[{i}][{r}][{c}] {why}"
        return None
    for j, v in enumerate(image):
        if (why := _bad_pixel(v)) is not None:
            return f"images[{i}][{j}] {why}"
    return None


def _explain_images(images: list[Any]) -> InputError:
    """Slow path: walk the values to name the first problem."""
    for i, image in enumerate(images):
        if (why := _layout_error(i, image)) is not None:
            return InputError(why)
    for i, image in enumerate(images):
        if (why := _first_bad_value(i, image)) is not None:
            return InputError(why)
    return InputError("images could not be read as numbers")  # pragma: no cover - guarded by the fast path


def _has_bool(images: list[Any]) -> bool:
    for image in images:
        for v in image:
            if v is True or v is False:
                return True
            if isinstance(v, list) and any(p is True or p is False for p in v):
                return True
    return False


def _as_pixel_array(images: list[Any]) -> np.ndarray:
    """All images as one (N, 784) numeric array, or InputError. Mixed layouts go image by image."""
    n = len(images)
    try:
        arr = np.asarray(images)
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is not None and arr.dtype.kind in "iuf":
        if arr.ndim == 2 and arr.shape[1] == IMAGE_PIXELS:
            return arr
        if arr.ndim == 3 and arr.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE):
            return arr.reshape(n, IMAGE_PIXELS)
        if arr.ndim == 1 and n == IMAGE_PIXELS:
            raise InputError(
                f"'images' is a flat list of {n} numbers; it must be a list of images, each "
                f"{IMAGE_PIXELS} numbers or {IMAGE_SIDE} lists of {IMAGE_SIDE} numbers "
                '(wrap a single image in a list: {"images": [[...]]})'
            )
    # Slow path: name the first structural problem, else read image by image (flat and 28x28 may mix).
    for i, image in enumerate(images):
        if (why := _layout_error(i, image)) is not None:
            raise InputError(why)
    rows = []
    for image in images:
        try:
            one = np.asarray(image).reshape(-1)
        except (ValueError, TypeError, OverflowError):
            raise _explain_images(images) from None
        if one.dtype.kind not in "iuf":
            raise _explain_images(images)
        rows.append(one)
    return np.stack(rows)


def validate_images(payload: dict[str, Any], limits: Limits = Limits(),
                    raw: bytes | None = None) -> np.ndarray:
    """``{"images": [...]}`` → float32 array (N, 784) of pixel values in 0–255.

    ``raw`` is the request body, when there is one: booleans hide inside numeric arrays (numpy reads
    ``true`` as 1), so the values are walked for them only when the body contains ``true`` or ``false``.
    """
    images = _take_field(payload, "images")
    _check_count("images", len(images), limits)
    arr = _as_pixel_array(images)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            i, j = np.argwhere(~finite)[0]
            raise InputError(
                f"images[{i}] pixel {j} is {arr[i, j].item()}; pixel values must be finite numbers in 0-255"
            )
    low, high = arr.min(), arr.max()
    if low < PIXEL_MIN or high > PIXEL_MAX:
        i, j = np.argwhere((arr < PIXEL_MIN) | (arr > PIXEL_MAX))[0]
        raise InputError(f"images[{i}] pixel {j} is {arr[i, j].item()!r}, outside 0-255")
    if (raw is None or b"true" in raw or b"false" in raw) and _has_bool(images):
        raise _explain_images(images)
    return arr.astype(np.float32, copy=False)


# --- texts ----------------------------------------------------------------------------------------------


def validate_texts(payload: dict[str, Any], limits: Limits = Limits()) -> list[str]:
    """``{"texts": ["…"]}`` → the list of texts, each a non-blank string within the length limit."""
    texts = _take_field(payload, "texts")
    _check_count("texts", len(texts), limits)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"texts[{i}] is {_describe(text)}; each text must be a string")
        if not text.strip():
            raise InputError(f"texts[{i}] is empty or blank; each text must have some content")
        if len(text) > limits.max_text_length:
            raise InputError(
                f"texts[{i}] has {len(text)} characters; at most {limits.max_text_length} are allowed"
            )
    return texts
