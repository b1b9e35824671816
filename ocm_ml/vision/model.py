"""The image network: torchvision's ResNet18 with a 1-channel first convolution.

Input: float tensor (N, 1, 28, 28), already normalized with the data version's mean/std. Output: logits (N, C).
"""

from __future__ import annotations

import torch
from torch import nn


def build_resnet18(num_classes: int = 10) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def normalize_pixels(pixels: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8/float pixels in 0-255, shape (N, 784) or (N, 28, 28) -> normalized (N, 1, 28, 28) float32."""
    x = pixels.to(torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (x - mean) / std
