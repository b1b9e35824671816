"""A classification head on frozen mean-pooled sentence embeddings, and the model folder it serves from.

- ``EmbeddingHead(dim, num_labels, hidden, dropout)``: standardize (train mean/std) -> [Linear -> GELU ->
  Dropout] -> Linear; ``hidden=0`` is a linear (logistic-regression) head.
- ``PooledHeadClassifier``: backbone encoder + mean pooling of its top ``layers`` states + head, with the
  ``model(**enc).logits`` and ``model.config.num_labels`` surface that ``TextPredictor`` uses for a
  fine-tuned classifier too.
- ``save_head_model_dir``: the folder ``TextPredictor.from_dir`` and the MLflow pyfunc read: the backbone
  (``save_pretrained`` of the encoder, ``config.json`` + weights), its tokenizer, ``labels.json``,
  ``head.json`` (sizes, pooling, layers, max_length) and ``head.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HEAD_CONFIG = "head.json"
HEAD_WEIGHTS = "head.safetensors"


class EmbeddingHead(torch.nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int, num_labels: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        layers: list[torch.nn.Module] = [torch.nn.Dropout(dropout)]
        if hidden > 0:
            layers += [torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout)]
        layers.append(torch.nn.Linear(hidden if hidden > 0 else dim, num_labels))
        self.net = torch.nn.Sequential(*layers)
        self.sizes = {"dim": dim, "num_labels": num_labels, "hidden": hidden, "dropout": dropout}

    def set_standardization(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)


class PooledHeadClassifier(torch.nn.Module):
    """Encoder -> the top ``layers`` states mean-pooled over the attention mask -> ``EmbeddingHead`` (the same
    features as :func:`ocm_ml.text.embeddings.embed_texts`, which the head was trained on)."""

    def __init__(self, encoder, head: EmbeddingHead, layers: int = 1):
        super().__init__()
        self.encoder, self.head, self.layers = encoder, head, layers
        self.config = SimpleNamespace(num_labels=head.sizes["num_labels"])

    def forward(self, input_ids, attention_mask, **extra) -> SimpleNamespace:
        from ocm_ml.text.embeddings import pool_top_layers

        kwargs = {k: v for k, v in extra.items() if k == "token_type_ids"}
        return SimpleNamespace(logits=self.head(pool_top_layers(self.encoder, self.layers, input_ids,
                                                                attention_mask, **kwargs)))


def save_head_model_dir(backbone_dir: str, head: EmbeddingHead, label_map: Mapping[str, str],
                        max_length: int, directory: str | Path, extra: Mapping[str, Any] | None = None,
                        layers: int = 1) -> str:
    """Write backbone + tokenizer + head + labels.json into ``directory`` (see the module docstring)."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    from ocm_ml.text.module import LABELS_FILE, check_label_map, load_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    AutoModel.from_pretrained(backbone_dir).save_pretrained(directory)
    load_tokenizer(backbone_dir, max_length).save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps(
        {**head.sizes, "pooling": "mean", "layers": int(layers), "max_length": int(max_length),
         **(extra or {})},
        indent=2))
    (directory / LABELS_FILE).write_text(json.dumps(check_label_map(label_map), indent=2))
    return str(directory)


def load_head_model(directory: str | Path) -> PooledHeadClassifier:
    from safetensors.torch import load_file
    from transformers import AutoModel

    directory = Path(directory)
    sizes = json.loads((directory / HEAD_CONFIG).read_text())
    head = EmbeddingHead(int(sizes["dim"]), int(sizes["num_labels"]), int(sizes["hidden"]),
                         float(sizes["dropout"]))
    head.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
    layers = int(sizes.get("layers", 1))  # folders written before the setting existed pooled the last layer
    return PooledHeadClassifier(AutoModel.from_pretrained(directory), head, layers).eval()
