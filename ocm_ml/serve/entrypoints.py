"""Ray Serve application builders for Serve config files: a KubeRay RayService's ``serveConfigV2``
(``deploy/kuberay/rayservice-endpoints.yaml``) or ``serve deploy config.yaml``.

Serve calls the builder named by ``import_path`` with the application's ``args``::

    applications:
      - name: fashion_mnist
        route_prefix: /fashion_mnist
        import_path: ocm_ml.serve.entrypoints:image_app
        args:
          model_uri: models:/prod.fashion-mnist-classifier@champion
          tracking_uri: http://mlflow.ocm.svc.cluster.local:5000
          registry_url: https://git.example.com/data/registry.git
          num_replicas: 2

``args`` holds the deployment's ``user_config`` keys (see :class:`~ocm_ml.serve.loading.ServeConfig`) plus
the deployment options in :data:`OPTION_KEYS` (``max_queued_requests`` and ``retry_after_s``: Serve's 503
with Retry-After once that many requests wait; ``code_version``: the git commit, as the endpoint asset sets
it). URIs in ``args`` must not carry credentials: the builder refuses them, and the submitted Serve config
itself is shown by the dashboard; the Ray pods' environment holds them
(``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``, git and DVC credential config). The applications are the
ones ``ServeControl`` deploys (same deployments, same code version), so the endpoint asset can hot-reload them
in place.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from ocm_ml.serve.deployments import build_app

#: ``args`` keys that configure the deployment rather than the model (``build_app`` keyword arguments).
OPTION_KEYS = (
    "num_replicas",
    "max_ongoing_requests",
    "autoscaling_config",
    "ray_actor_options",
    "max_queued_requests",
    "retry_after_s",
    "code_version",
)


def split_args(args: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(user_config, deployment options) of a Serve config's ``args``."""
    args = dict(args or {})
    options = {key: args.pop(key) for key in OPTION_KEYS if key in args}
    return args, options


def _build(kind: str, args: dict[str, Any] | None) -> serve.Application:
    user_config, options = split_args(args)
    options["version"] = options.pop("code_version", None)
    if user_config.setdefault("kind", kind) != kind:
        raise ValueError(f"this builder serves kind={kind!r}; args say kind={user_config['kind']!r}")
    return build_app(kind, user_config, **options)


def image_app(args: dict[str, Any]) -> serve.Application:
    """The image classifier application (``fashion_mnist``): ``POST /predict`` with ``{"images": …}``."""
    return _build("image", args)


def text_app(args: dict[str, Any]) -> serve.Application:
    """The text classifier application (``tweet_sentiment``): ``POST /predict`` with ``{"texts": …}``."""
    return _build("text", args)
