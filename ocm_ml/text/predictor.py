"""Batch inference from a model folder: ``save_model_dir`` (a fine-tuned classifier + tokenizer + labels.json)
or ``save_head_model_dir`` (backbone + tokenizer + head on mean-pooled embeddings + labels.json).

>>> predictor = TextPredictor.from_dir(best_checkpoint_dir)
>>> predictor.predict(["what a great day"])
[('positive', 0.93)]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ocm_ml.text.head import HEAD_CONFIG, load_head_model
from ocm_ml.text.module import LABELS_FILE, check_label_map


class TextPredictor:
    def __init__(
        self,
        model,
        tokenizer,
        label_map: Mapping[str, str],
        *,
        max_length: int | None = None,
        batch_size: int = 64,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label_map = check_label_map(label_map)
        self.labels = [self.label_map[str(i)] for i in range(len(self.label_map))]
        self.max_length = int(max_length or min(tokenizer.model_max_length, 512))
        self.batch_size = batch_size
        n_out = model.config.num_labels
        if n_out != len(self.labels):
            raise ValueError(f"model has {n_out} outputs but labels.json names {len(self.labels)} labels")

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, batch_size: int = 64) -> TextPredictor:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = Path(model_dir)
        labels_path = model_dir / LABELS_FILE
        if not labels_path.is_file():
            raise FileNotFoundError(f"{labels_path} not found: not a model folder written by save_model_dir")
        label_map = json.loads(labels_path.read_text())
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if (model_dir / HEAD_CONFIG).is_file():  # a head on frozen sentence embeddings (method "embeddings")
            model = load_head_model(model_dir)
        else:  # a fine-tuned sequence classifier (method "finetune")
            model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        return cls(model, tokenizer, label_map, batch_size=batch_size)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_labels), columns in label-id order."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start : start + self.batch_size]
                enc = self.tokenizer(
                    chunk, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
                )
                logits = self.model(**enc).logits
                out[start : start + len(chunk)] = torch.softmax(logits.float(), dim=-1).numpy()
        return out

    def predict_ids(self, texts: Sequence[str]) -> np.ndarray:
        return self.predict_proba(texts).argmax(axis=1) if len(texts) else np.zeros(0, dtype=np.int64)

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """``(label_name, confidence)`` per text."""
        proba = self.predict_proba(texts)
        ids = proba.argmax(axis=1)
        return [(self.labels[i], float(proba[row, i])) for row, i in enumerate(ids)]
