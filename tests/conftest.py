"""Shared fixtures: every test runs against its own temporary OCM_HOME; nothing touches ./.ocm or the network."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["OCM_ENV"] = "local"

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_ocm_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("ocm-home")
    old = os.environ.get("OCM_HOME")
    os.environ["OCM_HOME"] = str(home)
    os.environ.pop("OCM_REGISTRY_URL", None)
    yield home
    if old is None:
        os.environ.pop("OCM_HOME", None)
    else:
        os.environ["OCM_HOME"] = old
