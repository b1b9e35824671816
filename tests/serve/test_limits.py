"""Serving limits without a server: the body cap derived from max_batch, the header checks that refuse a
body before it is read, and URLs with credentials refused by the config and redacted from error texts."""

from __future__ import annotations

import json

import pytest

from ocm_ml.serve.loading import ServeConfig
from ocm_ml.serve.validation import (
    DEFAULT_MAX_BODY_BYTES,
    InputError,
    Limits,
    check_content_length,
    default_max_body_bytes,
    redact_credentials,
    url_credentials,
)

SECRET = "s3cr3t-t0ken"


def test_default_cap_fits_the_largest_legal_request_and_little_more():
    # The largest legal image request: max_batch images of 28 rows of 255s, as requests' json= writes it.
    square = [[255] * 28 for _ in range(28)]
    for max_batch in (1, 10, 1000):
        body = json.dumps({"images": [square] * max_batch}).encode()
        cap = ServeConfig(kind="image", max_batch=max_batch).limits.max_body_bytes
        assert len(body) <= cap
        if max_batch == 1000:
            assert cap < 1.5 * len(body)  # was 64 MiB, ~20x
    assert ServeConfig().limits.max_body_bytes == DEFAULT_MAX_BODY_BYTES < 8 * 1024 * 1024
    # Texts: max_batch texts of max_text_length characters that JSON escapes as \uXXXX.
    body = json.dumps({"texts": ["\x01" * 50] * 16}).encode()
    cap = ServeConfig(kind="text", max_batch=16, max_text_length=50).limits.max_body_bytes
    assert len(body) <= cap < len(body) + 70 * 1024
    assert cap == default_max_body_bytes("text", 16, 50)


def test_explicit_cap_wins_and_follows_max_batch_otherwise():
    assert ServeConfig(max_body_bytes=1234).limits.max_body_bytes == 1234
    small, large = (ServeConfig(max_batch=n).limits.max_body_bytes for n in (10, 100))
    assert small < large
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServeConfig(max_body_bytes=0)


def test_content_length_is_checked_before_reading():
    limits = Limits(max_batch=2, max_body_bytes=100)
    check_content_length(None, limits)
    check_content_length("100", limits)
    with pytest.raises(InputError) as info:
        check_content_length("1000", limits)
    err = info.value
    assert err.status_code == 413 and err.headers == {"Connection": "close"}
    assert "Content-Length 1000" in err.message and "at most 100 bytes" in err.message
    assert "max_batch=2" in err.message and "split the batch" in err.message
    with pytest.raises(InputError) as info:
        check_content_length("lots", limits)
    assert info.value.status_code == 400


@pytest.mark.parametrize("uri", [
    f"https://ocm:{SECRET}@mlflow.example.com",
    f"https://{SECRET}@git.example.com/data/registry.git",
    f"http://user:{SECRET}@127.0.0.1:5000/",
    f"postgresql://mlflow:{SECRET}@db:5432/mlflow",
    f"git+https://oauth2:{SECRET}@gitlab.example.com/r.git",
])
@pytest.mark.parametrize("key", ["tracking_uri", "registry_uri", "registry_url"])
def test_config_refuses_credentials_in_urls(key, uri):
    config = {"kind": "image", "model_uri": "models:/m/1", "registry_url": "/abs/registry", key: uri}
    with pytest.raises(ValueError) as info:
        ServeConfig.from_user_config(config)
    message = str(info.value)
    assert SECRET not in message
    assert key in message and "***@" in message
    assert "MLFLOW_TRACKING_USERNAME" in message and "environment" in message


@pytest.mark.parametrize("uri", [
    "sqlite:////abs/mlflow.db", "/abs/registry", "file:///abs/registry", "https://mlflow.example.com",
    "ssh://git@git.example.com/data/registry.git", "git@github.com:org/registry.git",
    "postgresql://mlflow@db:5432/mlflow", "databricks",
])
def test_config_accepts_urls_without_credentials(uri):
    assert not url_credentials(uri)
    ServeConfig.from_user_config({"kind": "image", "model_uri": "models:/m/1", "registry_url": uri,
                                  "tracking_uri": uri})


def test_challenger_uri_is_checked_too():
    with pytest.raises(ValueError, match="challenger_uri"):
        ServeConfig(model_uri="models:/m/1", registry_url="/r", challenger_uri=f"https://u:{SECRET}@h/x")


def test_redaction():
    text = (f"cannot read from https://ocm:{SECRET}@git.example.com/r.git and "
            f"'http://{SECRET}@h:1/a' (via s3://bucket/key, ssh://git@host/r)")
    out = redact_credentials(text)
    assert SECRET not in out
    assert "https://***@git.example.com/r.git" in out and "'http://***@h:1/a'" in out
    assert "s3://bucket/key" in out
    assert redact_credentials(None) is None and redact_credentials("no url here") == "no url here"


def test_build_app_refuses_credentials_before_serve_sees_them():
    from ocm_ml.serve.deployments import build_app

    with pytest.raises(ValueError) as info:
        build_app("image", {"model_uri": "models:/m/1", "registry_url": "/r",
                            "tracking_uri": f"https://u:{SECRET}@mlflow.example.com"})
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD"):
        build_app("image", {"model_uri": "models:/m/1", "registry_url": "/r"},
                  ray_actor_options={"num_cpus": 1,
                                     "runtime_env": {"env_vars": {"MLFLOW_TRACKING_PASSWORD": "x"}}})
    with pytest.raises(ValueError, match="max_queued_requests"):
        build_app("image", {"model_uri": "models:/m/1", "registry_url": "/r"}, max_queued_requests=0)


def test_serve_config_file_args_set_the_queue_bound_and_refuse_credentials():
    from ocm_ml.serve.deployments import DEFAULT_MAX_QUEUED_REQUESTS
    from ocm_ml.serve.entrypoints import image_app, text_app

    args = {"model_uri": "models:/m/1", "registry_url": "/abs/registry"}
    config = image_app({**args, "max_queued_requests": 8,
                        "retry_after_s": 3})._bound_deployment._deployment_config
    assert config.max_queued_requests == 8 and config.backpressure_config.retry_after_s == 3
    assert config.backpressure_config.status_code == 503
    assert "retry_after_s" not in config.user_config and "max_queued_requests" not in config.user_config
    default = text_app(dict(args))._bound_deployment._deployment_config
    assert default.max_queued_requests == DEFAULT_MAX_QUEUED_REQUESTS > 0
    assert default.backpressure_config.retry_after_s == 1
    with pytest.raises(ValueError) as info:
        text_app({**args, "registry_url": f"https://oauth2:{SECRET}@git.example.com/r.git"})
    assert SECRET not in str(info.value)
