"""The image network and its input normalization (defined with the predictor, which is self-contained so that
the registered model loads without ocm: see :mod:`ocm_ml.vision.predictor`)."""

from ocm_ml.vision.predictor import build_resnet18, normalize_pixels

__all__ = ["build_resnet18", "normalize_pixels"]
