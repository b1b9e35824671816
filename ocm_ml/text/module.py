"""The text classifier: a Hugging Face sequence-classification model inside a plain LightningModule.

- ``TextClassifier(backbone, label_map, learning_rate, weight_decay, freeze_layers)``: AdamW, cross-entropy
  from the HF head, per-epoch ``val_loss``, ``val_accuracy`` and ``val_macro_f1`` (and ``train_loss``).
- ``encode_texts`` / ``TextDataset`` / ``make_collate``: tokenize once (truncated to ``max_length``, not
  padded), pad per batch to its longest text.
- ``save_model_dir``: the folder every consumer reads: ``save_pretrained`` model + tokenizer (its
  ``model_max_length`` is the training ``max_length``) and ``labels.json`` (the label map,
  ``{"0": "negative"}``).
- ``accuracy`` / ``macro_f1``: plain numpy metrics shared with evaluation.

Label maps have string keys ``"0".."n-1"`` (as in the registry's metadata.json).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch

LABELS_FILE = "labels.json"


def check_label_map(label_map: Mapping[str, str]) -> dict[str, str]:
    """Return the label map with keys ``"0".."n-1"``; ``ValueError`` if it is anything else (the registry
    contract's one rule, :func:`ocm_ml.contract.check_label_map`)."""
    from ocm_ml.contract import check_label_map as contract_rule

    return contract_rule(label_map, where="label_map")


def accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """F1 averaged over the classes seen in ``y_true`` or ``y_pred`` (scikit-learn's ``average="macro"``)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.union1d(y_true, y_pred)
    if len(classes) == 0:
        return float("nan")
    scores = []
    for c in classes:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def load_hf_model(backbone: str, label_map: Mapping[str, str]):
    """``AutoModelForSequenceClassification`` with a fresh head for the label map (no download if local)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    label_map = check_label_map(label_map)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier.* newly initialized" report is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            backbone,
            num_labels=len(label_map),
            id2label={int(k): v for k, v in label_map.items()},
            label2id={v: int(k) for k, v in label_map.items()},
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tokenizer(backbone: str, max_length: int | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    if max_length is not None:
        tokenizer.model_max_length = int(max_length)
    return tokenizer


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, list[list[int]]]:
    """Token ids (with [CLS]/[SEP]) truncated to ``max_length``, unpadded."""
    return dict(tokenizer(list(texts), truncation=True, max_length=max_length, padding=False))


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, encodings: Mapping[str, list[list[int]]], labels: Sequence[int] | None = None):
        self.encodings = encodings
        self.labels = None if labels is None else [int(x) for x in labels]
        self._n = len(next(iter(encodings.values())))
        if self.labels is not None and len(self.labels) != self._n:
            raise ValueError(f"{self._n} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        item: dict[str, Any] = {k: v[i] for k, v in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def make_collate(tokenizer):
    """Pad a list of encoded items to the longest in the batch; returns tensors."""

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        labels = [it.pop("labels") for it in items] if "labels" in items[0] else None
        batch = tokenizer.pad(items, padding=True, return_tensors="pt")
        batch = dict(batch)
        if labels is not None:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch

    return collate


def freeze_lower_layers(model, n: int) -> int:
    """Freeze the embeddings and the lowest ``n`` encoder layers; returns how many layers were frozen."""
    if n <= 0:
        return 0
    base = model.base_model
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"freeze_layers={n}: {type(base).__name__} has no encoder.layer list to freeze")
    if n > len(layers):
        raise ValueError(f"freeze_layers={n} but the backbone has only {len(layers)} encoder layers")
    modules = [base.embeddings, *layers[:n]] if hasattr(base, "embeddings") else list(layers[:n])
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)
    return n


class TextClassifier(lightning.LightningModule):
    """Fine-tunes a sequence-classification transformer.

    >>> module = TextClassifier(resolve_backbone(None), {"0": "negative", "1": "neutral", "2": "positive"},
    ...                         learning_rate=5e-5, freeze_layers=4)
    """

    def __init__(
        self,
        backbone: str,
        label_map: Mapping[str, str],
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        freeze_layers: int = 0,
    ):
        super().__init__()
        self.label_map = check_label_map(label_map)
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "label_map": self.label_map,
                "learning_rate": learning_rate,
                "weight_decay": weight_decay,
                "freeze_layers": freeze_layers,
            }
        )
        self.model = load_hf_model(backbone, self.label_map)
        freeze_lower_layers(self.model, freeze_layers)
        self._val_preds: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._val_losses: list[tuple[float, int]] = []

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.log("train_loss", out.loss, on_step=False, on_epoch=True, batch_size=len(batch["labels"]))
        return out.loss

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch)
        n = len(batch["labels"])
        self._val_losses.append((float(out.loss) * n, n))
        self._val_preds.append(out.logits.argmax(-1).cpu())
        self._val_labels.append(batch["labels"].cpu())

    def on_validation_epoch_start(self):
        self._val_preds, self._val_labels, self._val_losses = [], [], []

    def on_validation_epoch_end(self):
        if not self._val_labels:
            return
        y_pred = torch.cat(self._val_preds).numpy()
        y_true = torch.cat(self._val_labels).numpy()
        total = sum(n for _, n in self._val_losses)
        self.log("val_loss", sum(s for s, _ in self._val_losses) / total)
        self.log("val_accuracy", accuracy(y_true, y_pred))
        self.log("val_macro_f1", macro_f1(y_true, y_pred))

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params,
            lr=self.hparams.learning_rate,  # pyright: ignore[reportAttributeAccessIssue]  # hparams stubs
            weight_decay=self.hparams.weight_decay,  # pyright: ignore[reportAttributeAccessIssue]  # same
        )


def save_model_dir(model, tokenizer, label_map: Mapping[str, str], directory: str | Path) -> str:
    """Write model + tokenizer (``save_pretrained``) and ``labels.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / LABELS_FILE).write_text(json.dumps(check_label_map(label_map), indent=2))
    return str(directory)
