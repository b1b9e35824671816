"""The image model as MLflow logs it: :mod:`ocm_ml.vision.predictor` as model code, its weights as safetensors
and the normalization and class names of its data version as JSON. Loads in plain MLflow (no ocm, no pickle).
"""

from __future__ import annotations

import tempfile
from typing import Any

from ocm_ml.text.pyfunc import runtime_requirements
from ocm_ml.vision import predictor as predictor_module
from ocm_ml.vision.predictor import ImagePredictor

_RUNTIME_PACKAGES = ("mlflow", "torch", "torchvision", "numpy", "pandas", "safetensors")


def image_signature():
    """Input: a column ``image`` holding one image per row (784 flat or 28x28 nested pixel values, 0-255);
    output: ``class_id``, ``class_name``, ``confidence``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "image")]),
        outputs=Schema([ColSpec("long", "class_id"), ColSpec("string", "class_name"),
                        ColSpec("double", "confidence")]),
    )


def log_image_model(predictor: ImagePredictor, name: str = "model", input_example: Any = None):
    """``mlflow.pyfunc.log_model`` of ``predictor`` into the active run; returns the ModelInfo.

    ``input_example``: a few images (N, 784) in 0-255; two zero images when None.
    """
    import mlflow
    import numpy as np
    import pandas as pd

    if input_example is None:
        input_example = np.zeros((2, 784), dtype=np.uint8)
    example = pd.DataFrame({"image": [np.asarray(row).reshape(-1).astype(int).tolist()
                                      for row in input_example]})
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = predictor.save(tmp)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=predictor_module.__file__,
            artifacts=artifacts,
            signature=image_signature(),
            input_example=example,
            pip_requirements=runtime_requirements(_RUNTIME_PACKAGES),
        )
