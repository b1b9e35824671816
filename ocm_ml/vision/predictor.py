"""One predictor for batch evaluation and the Serve deployment: 0-255 pixels in, class ids and confidences out.

>>> predictor = ImagePredictor.from_checkpoint(result.checkpoint_path, mean=0.286, std=0.353,
...                                            class_names=FASHION_MNIST_CLASSES)
>>> class_ids, confidences = predictor.predict(np.zeros((4, 784), dtype=np.uint8))
>>> predictor.class_name(int(class_ids[0]))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ocm_ml.vision.lightning_module import load_network
from ocm_ml.vision.model import normalize_pixels


class ImagePredictor:
    """Wraps a trained network (``nn.Module`` taking normalized (N, 1, 28, 28) input) with its normalization."""

    def __init__(self, model: nn.Module, mean: float, std: float, class_names: Sequence[str]):
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.model = model.eval()
        self.mean = float(mean)
        self.std = float(std)
        self.class_names = tuple(class_names)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, mean: float, std: float, class_names: Sequence[str]
    ) -> ImagePredictor:
        """From a local Ray Train checkpoint folder (holding ``checkpoint.ckpt``) or a Lightning ``.ckpt`` file."""
        return cls(load_network(path), mean, std, class_names)

    def class_name(self, class_id: int) -> str:
        return self.class_names[class_id] if 0 <= class_id < len(self.class_names) else str(class_id)

    def predict(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Pixels in 0-255, shape (N, 784) or (N, 28, 28) -> (class ids int64 (N,), confidences float32 (N,)).

        Raises ``ValueError`` for a wrong shape or an empty batch; range/NaN checks belong to the caller (the
        Serve app answers those with a 4xx before getting here).
        """
        batch = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, torch.Tensor) else pixels)
        if (
            batch.ndim not in (2, 3)
            or batch.shape[0] == 0
            or tuple(batch.shape[1:]) not in ((784,), (28, 28))
        ):
            raise ValueError(
                f"expected a non-empty batch of shape (N, 784) or (N, 28, 28), got {tuple(batch.shape)}"
            )
        with torch.inference_mode():
            logits = self.model(normalize_pixels(batch, self.mean, self.std))
            probabilities = torch.softmax(logits.float(), dim=1)
            confidences, class_ids = probabilities.max(dim=1)
        return class_ids.numpy().astype(np.int64), confidences.numpy().astype(np.float32)
