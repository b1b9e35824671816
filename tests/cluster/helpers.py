"""Shared bits of the cluster-path tests: the project's files, the cluster environment, free ports."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGE_REPOSITORY = "ghcr.io/ocm/ocm-code-location"
MODULE = "ocm_assets.definitions"
BUCKETS = ("ocm-checkpoints", "ocm-dvc", "ocm-mlflow")
REGION = "us-east-1"

#: Distinctive secret values: grepping for them cannot match anything by accident.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAOCMTESTKEYID0001",
    "AWS_SECRET_ACCESS_KEY": "sekret-value-123",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-sekret-456",
    "MLFLOW_TRACKING_PASSWORD": "ocm-password-sekret-000",
}
#: Credentials that are identities, not secrets (MLflow records the user of each run as ``mlflow.user``).
IDENTITIES = {"MLFLOW_TRACKING_USERNAME": "ocm-ci-user"}

#: Every variable ocm_resources/env.py reads; tests clear them all before setting their own.
ENV_VARS = (
    "OCM_ENV", "OCM_REGISTRY_URL", "OCM_DVC_REMOTE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
    "MLFLOW_UI_URL", "OCM_MLFLOW_ENV", "OCM_MLFLOW_ARTIFACT_ROOT", "OCM_CHECKPOINT_PATH", "OCM_S3_ENDPOINT",
    "AWS_REGION", "AWS_DEFAULT_REGION", "RAY_ADDRESS", "OCM_SERVE_RAY_ADDRESS", "OCM_SERVE_HOST",
    "OCM_SERVE_PORT", "OCM_IMAGE", "OCM_IMAGE_TAG", "OCM_KUBERAY_KIND", "OCM_RAY_NAMESPACE",
    "OCM_RAY_AUTH_SECRET", "OCM_RAY_MAX_WORKERS", "OCM_EXECUTOR", "OCM_STEP_CPU", "OCM_STEP_MEMORY",
    "OCM_TRAIN_CPU", "OCM_TRAIN_MEMORY", "OCM_TRAIN_GPUS", "OCM_MAX_CONCURRENT_STEPS", "OCM_IO_BUCKET",
    "OCM_IO_PREFIX", *SECRETS, *IDENTITIES,
)


def set_env(monkeypatch, values: dict[str, str]) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[name.lower().replace("_", "-")] = version
    return pins


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object under deploy/ by (kind, name); the Helm values file is not one."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.parent.name == "helm":
            continue
        for doc in load_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def walk(node: Any, key: str):
    """Every value stored under ``key`` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_keys(s3: dict[str, Any], bucket: str, prefix: str = "") -> list[str]:
    """Object keys under ``prefix`` in ``bucket`` of the test S3 server (a second, independent client)."""
    listing = s3["client"].list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))
