"""Request validation: every malformed body is an InputError with a 4xx and a message that names the
problem."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ocm_ml.serve.validation import InputError, Limits, parse_json_body, validate_images, validate_texts

FLAT = [0.0] * 784
SQUARE = [[0] * 28 for _ in range(28)]


def images_error(payload, limits=None, raw=None) -> InputError:
    with pytest.raises(InputError) as info:
        validate_images(payload, limits or Limits(), raw=raw)
    assert 400 <= info.value.status_code < 500
    return info.value


@pytest.mark.parametrize(
    "images, shape",
    [
        ([FLAT], (1, 784)),
        ([SQUARE, SQUARE], (2, 784)),
        ([FLAT, SQUARE], (2, 784)),  # layouts may mix
        ([[255] * 784] * 3, (3, 784)),
        ([[12.5] * 784], (1, 784)),
    ],
)
def test_valid_images(images, shape):
    arr = validate_images({"images": images})
    assert arr.shape == shape and arr.dtype == np.float32


def test_values_survive_both_layouts():
    square = np.arange(784).reshape(28, 28) % 256
    out = validate_images({"images": [square.tolist(), square.reshape(-1).tolist()]})
    np.testing.assert_array_equal(out[0], out[1])
    assert out[0, 300] == 300 % 256


@pytest.mark.parametrize(
    "payload, words",
    [
        ({}, "missing field 'images'"),
        ({"image": [FLAT]}, "missing field 'images'"),
        ({"images": [FLAT], "extra": 1}, "unexpected field"),
        ({"images": []}, "is empty"),
        ({"images": "abc"}, "must be a list"),
        ({"images": None}, "must be a list"),
        ({"images": FLAT}, "flat list of 784 numbers"),
        ({"images": [[0.0] * 783]}, "has 783 values"),
        ({"images": [FLAT, [0.0] * 785]}, "images[1] has 785 values"),
        ({"images": [[[0] * 28] * 27]}, "has 27 rows"),
        ({"images": [[[0] * 27] + [[0] * 28] * 27]}, "images[0][0] has 27 values"),
        ({"images": [[[[0] * 28] * 28]]}, "each image must be"),
        ({"images": [5]}, "images[0] is the number 5"),
        ({"images": [{"pixels": FLAT}]}, "images[0] is an object"),
        ({"images": [[0.0] * 783 + [float("nan")]]}, "pixel 783 is nan"),
        ({"images": [[float("inf")] + [0.0] * 783]}, "pixel 0 is inf"),
        ({"images": [[-1] + [0] * 783]}, "pixel 0 is -1, outside 0-255"),
        ({"images": [FLAT, [0] * 10 + [256] + [0] * 773]}, "images[1] pixel 10 is 256"),
        ({"images": [["1"] + [0] * 783]}, "images[0][0] is a string ('1')"),
        ({"images": [[None] + [0] * 783]}, "images[0][0] is null"),
        ({"images": [[True] + [0] * 783]}, "images[0][0] is a boolean (true)"),
        ({"images": [[False] * 784]}, "is a boolean (false)"),
        ({"images": [SQUARE[:27] + [[0] * 27 + ["x"]]]}, "images[0][27][27] is a string"),
        ({"images": [[10**30] + [0] * 783]}, "outside 0-255"),
    ],
)
def test_bad_images(payload, words):
    assert words in images_error(payload).message


def test_hidden_booleans_are_found_from_the_raw_body():
    body = json.dumps({"images": [[1, True] + [0] * 782]}).encode()
    err = images_error(json.loads(body), raw=body)
    assert "images[0][1] is a boolean (true)" in err.message


def test_batch_cap_is_configurable():
    validate_images({"images": [FLAT] * 1000})
    assert "at most 1000" in images_error({"images": [FLAT] * 1001}).message
    assert "holds 3 items; at most 2" in images_error({"images": [FLAT] * 3}, Limits(max_batch=2)).message


@pytest.mark.parametrize(
    "body, content_type, status, words",
    [
        (b"{", "application/json", 400, "not valid JSON"),
        (b"", "application/json", 400, "empty"),
        (b"images=1", "application/x-www-form-urlencoded", 415, "Content-Type"),
        (b'{"images": [[NaN]]}', "application/json", 422, "NaN and Infinity"),
        (b"[1, 2]", "application/json", 422, "must be a JSON object"),
        (b'"x"', None, 422, "must be a JSON object"),
        (b"x" * 100, "application/json", 413, "accepts at most 10 bytes"),
    ],
)
def test_bad_bodies(body, content_type, status, words):
    limits = Limits(max_body_bytes=10) if status == 413 else Limits()
    with pytest.raises(InputError) as info:
        parse_json_body(body, content_type, limits)
    assert info.value.status_code == status and words in info.value.message


def test_json_content_types_accepted():
    assert parse_json_body(b'{"a": 1}', "application/json; charset=utf-8") == {"a": 1}
    assert parse_json_body(b'{"a": 1}', "application/vnd.ocm+json") == {"a": 1}
    assert parse_json_body(b'{"a": 1}', None) == {"a": 1}


def test_texts():
    assert validate_texts({"texts": ["good", "bad day"]}) == ["good", "bad day"]
    limits = Limits(max_batch=2, max_text_length=5)
    for payload, words in [
        ({"texts": []}, "is empty"),
        ({"texts": "good"}, "must be a list"),
        ({"texts": ["ok", 3]}, "texts[1] is the number 3"),
        ({"texts": [None]}, "texts[0] is null"),
        ({"texts": ["  "]}, "texts[0] is empty or blank"),
        ({"texts": ["toolong"]}, "has 7 characters; at most 5"),
        ({"texts": ["a", "b", "c"]}, "at most 2"),
        ({"images": ["a"]}, "missing field 'texts'"),
    ]:
        with pytest.raises(InputError) as info:
            validate_texts(payload, limits)
        assert words in info.value.message, (payload, info.value.message)


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError):
        Limits(max_batch=0)
