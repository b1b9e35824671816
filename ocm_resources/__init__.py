"""ocm's resources: one per external system (DVC registry, Ray, MLflow, Serve), local and remote behind
one interface. Heavy clients are imported inside methods."""

from ocm_resources.registry import DataRegistry, DvcRegistry, RegistryError, RegistryVersion

__all__ = ["DataRegistry", "DvcRegistry", "RegistryError", "RegistryVersion"]
