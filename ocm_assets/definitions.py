"""The ocm code location: every family's graph, jobs and sensors, and the resources of ``OCM_ENV``.

Loads without importing torch, ray, lightning, transformers, mlflow, dvc or pandera: the UI, the CLI and
every run wait for this module.
"""

from ocm_assets.build import build_definitions

defs = build_definitions()
