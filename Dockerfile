# syntax=docker/dockerfile:1.7
# One image for every place ocm code runs on the cluster: the Dagster code-location gRPC server (Helm user
# deployment, Dagster+ build, run and step pods) and the Ray head and worker pods of the KubeRay RayCluster
# and RayService. One image means one Python (3.11) and one Ray (2.60.0, from requirements.lock) everywhere:
# Ray refuses to join nodes whose Python or Ray versions differ, and Serve/Train ship pickled ocm code.
#
#   docker build -t ghcr.io/ocm/ocm-code-location:$(git rev-parse --short HEAD) .
#
# The stack is installed exactly as scripts/install.sh does it: requirements.lock (a full `pip freeze` with
# the ANTLR/omegaconf fix-up, see README "Install details") with --no-deps, then ocm itself with --no-deps.

ARG PYTHON_VERSION=3.11.7
ARG DEBIAN_RELEASE=bookworm
# must equal the ray pin in requirements.lock (checked while building) and rayVersion in deploy/kuberay/
ARG RAY_VERSION=2.60.0

# ---- base: Python and the system tools ocm needs at run time ------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RAY_USAGE_STATS_ENABLED=0 \
    DVC_NO_ANALYTICS=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
# git: the DVC registry (`git ls-remote`, dvc.api); wget: KubeRay's health probes; tini: PID 1 that reaps
# the gRPC server's and Ray's child processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git wget ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /bin/bash ocm

# ---- deps: the locked stack in a virtualenv ------------------------------------------------------------------
FROM base AS deps
ARG RAY_VERSION
RUN python -m venv /opt/venv
COPY requirements.lock /tmp/requirements.lock
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip install --no-deps -r /tmp/requirements.lock \
    && python -c "import sys, ray; v = ray.__version__; sys.exit(0 if v == '${RAY_VERSION}' else f'requirements.lock has ray {v}, the image promises ${RAY_VERSION}: update RAY_VERSION and deploy/')"

# ---- build: ocm itself, not editable ------------------------------------------------------------------------
FROM deps AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ocm_assets ./ocm_assets
COPY ocm_resources ./ocm_resources
COPY ocm_ml ./ocm_ml
COPY ocm_cli ./ocm_cli
RUN pip install --no-deps /src

# ---- runtime: the code-location server and the Ray node image ---------------------------------------------------
FROM base AS runtime
ARG RAY_VERSION
# Lineage of code: `docker build --build-arg OCM_IMAGE_TAG=<tag> --build-arg OCM_CODE_VERSION=$(git rev-parse HEAD)`;
# MLflow runs record them as docker_image_tag and code_version (the image has no .git to read).
ARG OCM_IMAGE_TAG=unset
ARG OCM_CODE_VERSION=unset
ENV OCM_IMAGE_TAG=${OCM_IMAGE_TAG} \
    OCM_CODE_VERSION=${OCM_CODE_VERSION}
LABEL org.opencontainers.image.title="ocm" \
      org.opencontainers.image.description="ocm Dagster code location and Ray node image" \
      io.ray.version="${RAY_VERSION}"
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/ocm
COPY --chown=1000:1000 pyproject.toml workspace.yaml dagster_cloud.yaml ./
USER 1000
# 3030 Dagster gRPC; 6379 Ray GCS, 8265 Ray dashboard, 10001 Ray Client, 8000 Serve HTTP (Ray pods)
EXPOSE 3030 6379 8265 10001 8000
ENTRYPOINT ["tini", "--"]
CMD ["dagster", "api", "grpc", "-m", "ocm_assets.definitions", "-h", "0.0.0.0", "-p", "3030"]

