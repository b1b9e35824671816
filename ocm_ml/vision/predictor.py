"""The one image predictor: 0-255 pixels in, class ids, names and confidences out.

The same code serves batch evaluation, the Serve deployment and the registered MLflow model. This file is
self-contained on purpose (numpy, pandas, torch, torchvision, safetensors, mlflow; no ocm import): it is
logged as MLflow *model code* (``mlflow.pyfunc.log_model(python_model=<this file>)``), so a registered
version loads in plain MLflow, without ocm installed::

    model = mlflow.pyfunc.load_model("models:/local.fashion-mnist-classifier@champion")
    model.predict(pd.DataFrame({"image": [[0] * 784]}))     # or 28x28 nested lists, 0-255
    #    class_id   class_name  confidence
    # 0         0  T-shirt/top        0.71

Artifacts of a logged model: ``weights`` (the network's state dict as safetensors, no pickle) and
``preprocessing`` (JSON: ``mean``, ``std``, ``classes`` of the data version it was trained on).

>>> predictor = ImagePredictor(build_resnet18(10), mean=0.286, std=0.353, class_names=CLASSES)
>>> class_ids, confidences = predictor.predict(np.zeros((4, 784), dtype=np.uint8))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc.model import PythonModel  # where it is defined: mlflow.pyfunc does not re-export it
from torch import nn

WEIGHTS_ARTIFACT = "weights"
PREPROCESSING_ARTIFACT = "preprocessing"
ARCHITECTURE = "resnet18-1ch-28x28"
OUTPUT_COLUMNS = ("class_id", "class_name", "confidence")


def build_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet18 with a 1-channel first convolution: normalized (N, 1, 28, 28) -> logits
    (N, C)."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def normalize_pixels(pixels: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8/float pixels in 0-255, shape (N, 784) or (N, 28, 28) -> normalized (N, 1, 28, 28) float32."""
    x = pixels.to(torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (x - mean) / std


class ImagePredictor:
    """A network taking normalized (N, 1, 28, 28) input, with the normalization and class names of its
    data."""

    def __init__(self, model: nn.Module, mean: float, std: float, class_names: Sequence[str]):
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.model = model.eval()
        self.mean = float(mean)
        self.std = float(std)
        self.class_names = tuple(str(c) for c in class_names)

    @classmethod
    def from_files(cls, weights: str | Path, preprocessing: str | Path) -> ImagePredictor:
        """From the artifacts of a logged model: safetensors weights and the preprocessing JSON."""
        from safetensors.torch import load_file

        spec = json.loads(Path(preprocessing).read_text())
        if spec.get("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise ValueError(f"unknown architecture {spec.get('architecture')!r}; this code builds "
                             f"{ARCHITECTURE}")
        network = build_resnet18(len(spec["classes"]))
        network.load_state_dict(load_file(str(weights), device="cpu"))
        return cls(network, spec["mean"], spec["std"], spec["classes"])

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, mean: float, std: float, class_names: Sequence[str]
    ) -> ImagePredictor:
        """From a local Ray Train checkpoint folder (holding ``checkpoint.ckpt``) or a Lightning ``.ckpt``
        file (needs ocm: the only method here that does)."""
        from ocm_ml.vision.lightning_module import load_network

        return cls(load_network(path), mean, std, class_names)

    def preprocessing(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, "mean": self.mean, "std": self.std,
                "classes": list(self.class_names)}

    def save(self, folder: str | Path) -> dict[str, str]:
        """Write the artifacts of :meth:`from_files` into ``folder``; returns ``{artifact name: path}``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights, spec = folder / "model.safetensors", folder / "preprocessing.json"
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(weights))
        spec.write_text(json.dumps(self.preprocessing(), indent=2) + "\n")
        return {WEIGHTS_ARTIFACT: str(weights), PREPROCESSING_ARTIFACT: str(spec)}

    def class_name(self, class_id: int) -> str:
        return self.class_names[class_id] if 0 <= class_id < len(self.class_names) else str(class_id)

    def predict_proba(self, pixels: np.ndarray | torch.Tensor, chunk: int = 256) -> np.ndarray:
        """Pixels in 0-255, shape (N, 784) or (N, 28, 28) -> class probabilities float32 (N, C)."""
        batch = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, torch.Tensor) else pixels)
        if (batch.ndim not in (2, 3) or batch.shape[0] == 0
                or tuple(batch.shape[1:]) not in ((784,), (28, 28))):
            raise ValueError(
                f"expected a non-empty batch of shape (N, 784) or (N, 28, 28), got {tuple(batch.shape)}"
            )
        out = []
        with torch.inference_mode():
            for start in range(0, len(batch), chunk):
                logits = self.model(normalize_pixels(batch[start : start + chunk], self.mean, self.std))
                out.append(torch.softmax(logits.float(), dim=1).numpy())
        return np.concatenate(out)

    def predict(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Pixels in 0-255, shape (N, 784) or (N, 28, 28) -> (class ids int64 (N,), confidences float32 (N,)).

        Raises ``ValueError`` for a wrong shape or an empty batch; range/NaN checks belong to the caller (the
        Serve app answers those with a 4xx before getting here).
        """
        proba = self.predict_proba(pixels)
        ids = proba.argmax(axis=1)
        return ids.astype(np.int64), proba[np.arange(len(ids)), ids].astype(np.float32)


def pixels_from(model_input: Any) -> np.ndarray:
    """The (N, 784) float32 pixels of a pyfunc input: a DataFrame with an ``image`` column (one flat list of
    784 or 28x28 nested lists per row), a dict ``{"image": [...]}``, or an array (N, 784) / (N, 28, 28)."""
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            rows = model_input["image"].tolist()
        elif model_input.shape[1] == 784:
            rows = model_input.to_numpy()
        else:
            raise ValueError(
                "expected a DataFrame with an 'image' column (or 784 pixel columns), got "
                f"{list(model_input.columns)[:5]}"
            )
    elif isinstance(model_input, dict):
        if "image" not in model_input:
            raise ValueError(f"expected {{'image': [...]}}, got keys {sorted(model_input)}")
        rows = model_input["image"]
    else:
        rows = model_input
    try:
        pixels = np.asarray([np.asarray(r, dtype=np.float32).reshape(-1) for r in rows], dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"every image must be 784 pixel values (flat or 28x28): {exc}") from None
    if pixels.ndim != 2 or pixels.shape[1] != 784:
        raise ValueError(f"every image must be 784 pixel values (flat or 28x28), got shape {pixels.shape}")
    if not np.isfinite(pixels).all() or pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise ValueError("pixel values must be finite numbers in 0-255")
    return pixels


class ImageClassifierModel(PythonModel):
    """The registered image model: raw pixels in, ``class_id``, ``class_name``, ``confidence`` out."""

    def __init__(self) -> None:
        self.predictor: ImagePredictor | None = None

    def load_context(self, context) -> None:
        self.predictor = ImagePredictor.from_files(
            context.artifacts[WEIGHTS_ARTIFACT], context.artifacts[PREPROCESSING_ARTIFACT]
        )

    # mlflow's PythonModel.predict has no return annotation, so pyright infers None for it
    def predict(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if self.predictor is None:
            raise RuntimeError("the model's artifacts are not loaded (load it with mlflow.pyfunc.load_model)")
        ids, confidences = self.predictor.predict(pixels_from(model_input))
        return pd.DataFrame({
            "class_id": ids,
            "class_name": [self.predictor.class_name(int(i)) for i in ids],
            "confidence": confidences.astype(np.float64),
        # pandas-stubs' SequenceNotStr rejects list[str] under this typeshed (list.index's signature)
        }, columns=list(OUTPUT_COLUMNS))  # pyright: ignore[reportArgumentType]


if __name__ != "ocm_ml.vision.predictor":  # executed by MLflow as model code, not imported by ocm
    mlflow.models.set_model(ImageClassifierModel())
