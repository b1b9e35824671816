"""Frozen-backbone sentence features: every text embedded once, cached, reused by every trial and re-run.

- ``embed_texts(texts, backbone_dir, max_length, layers=1)``: the backbone's top ``layers`` hidden states,
  each mean-pooled over the attention mask and concatenated (``layers=1``: the last one, the all-MiniLM
  sentence embedding), as a Ray Data ``map_batches`` over an actor pool (``Embedder``, one torch thread per
  actor). Texts are sorted by token count before batching, so each batch pads to a similar length.
- ``EmbeddingCache(root)``: ``.npy`` files keyed by (data version, backbone id, ``max_length``, ``layers``)
  under ``root/<backbone id>/``. A new data version (content md5) or another backbone (its config and
  weights' md5) misses; the same pair hits. ``misses`` counts the texts that were really embedded.

>>> cache = EmbeddingCache("/data/ocm/embedding-cache")
>>> train = cache.get(texts, data_key=content_md5, backbone_dir=resolve_backbone(None), max_length=64,
...                   layers=2)
>>> train.shape, cache.hits, cache.misses
((29726, 768), 0, 1)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

#: Weight files whose bytes identify a backbone (besides config.json and the tokenizer's vocabulary).
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.txt")


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def backbone_id(backbone_dir: str | Path) -> str:
    """A short id of a local backbone from the bytes of its config, weights and vocabulary (a retrained or
    replaced backbone in the same folder gets a new id); a hub name is its own id."""
    folder = Path(backbone_dir)
    if not folder.is_dir():
        return hashlib.sha256(str(backbone_dir).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for name in ("config.json", *_WEIGHT_FILES):
        if (folder / name).is_file():
            digest.update(f"{name}:{_file_md5(folder / name)};".encode())
    return digest.hexdigest()[:16]


def data_md5(url: str) -> str:
    """The md5 of a split file's bytes (a registry file's DVC md5), for callers without the registry's."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(url if "://" in url else Path(url).resolve().as_uri())
    digest = hashlib.md5()
    with filesystem.open_input_stream(path) as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mean_pool(hidden, mask):
    """Mean of the token states where ``mask`` is 1 (the all-MiniLM sentence embedding)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def pool_top_layers(encoder, layers: int, input_ids, attention_mask, **kwargs):
    """The top ``layers`` hidden states of ``encoder``, each mean-pooled, concatenated (last layer last)."""
    import torch

    out = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=layers > 1,
                  **kwargs)
    states = out.hidden_states[-layers:] if layers > 1 else (out.last_hidden_state,)
    return torch.cat([mean_pool(h, attention_mask) for h in states], dim=-1)


class Embedder:
    """Ray Data callable class: ``{"row", "text"}`` batches -> ``{"row", "embedding"}``."""

    def __init__(self, backbone_dir: str, max_length: int, threads: int = 1, layers: int = 1):
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
        self.model = AutoModel.from_pretrained(backbone_dir).eval()
        self.max_length, self.layers = max_length, layers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        texts = [str(t) for t in batch["text"]]
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        with torch.inference_mode():
            pooled = pool_top_layers(self.model, self.layers, **enc).float().numpy()
        return {"row": np.asarray(batch["row"]), "embedding": pooled}


def embed_texts(
    texts: Sequence[str],
    backbone_dir: str,
    max_length: int,
    *,
    actors: int = 2,
    batch_size: int = 128,
    layers: int = 1,
) -> np.ndarray:
    """(len(texts), layers * hidden) float32 sentence embeddings, computed on the initialised Ray by
    ``actors`` ``Embedder`` actors (1 CPU each)."""
    import ray.data
    from transformers import AutoTokenizer

    if len(texts) == 0:
        raise ValueError("embed_texts: no texts")
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    lengths = [len(ids) for ids in tokenizer([str(t) for t in texts], truncation=True,
                                             max_length=max_length)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    items = [{"row": int(i), "text": str(texts[i])} for i in order]
    blocks = max(1, min(len(items) // batch_size, 4 * actors))
    embedded = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        Embedder,
        fn_constructor_kwargs={"backbone_dir": backbone_dir, "max_length": max_length, "threads": 1,
                               "layers": layers},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=1,
    )
    out: np.ndarray | None = None
    seen = 0
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        if out is None:
            out = np.zeros((len(texts), batch["embedding"].shape[1]), dtype=np.float32)
        out[batch["row"]] = batch["embedding"]
        seen += len(batch["row"])
    if out is None or seen != len(texts):
        raise RuntimeError(f"embed_texts: {seen} embeddings came back for {len(texts)} texts")
    return out


class EmbeddingCache:
    """Embeddings on disk per (data version, backbone, max_length); see the module docstring."""

    def __init__(self, root: str | Path, embed: Callable[..., np.ndarray] = embed_texts):
        self.root = Path(root).expanduser()
        self.embed = embed
        self.hits = 0
        self.misses = 0
        self.texts_embedded = 0

    def path_for(self, data_key: str, backbone: str, max_length: int, layers: int = 1) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in data_key)[:120]
        return self.root / backbone / f"{safe}-len{max_length}-top{layers}.npy"

    def get(self, texts: Sequence[str], *, data_key: str, backbone_dir: str, max_length: int, layers: int = 1,
            **embed_kwargs) -> np.ndarray:
        """The cached embeddings of ``texts`` (the rows of data version ``data_key``), or embed and store."""
        if not data_key:
            raise ValueError("EmbeddingCache.get needs a data_key (the split's content md5)")
        path = self.path_for(data_key, backbone_id(backbone_dir), max_length, layers)
        if path.is_file():
            cached = np.load(path)
            if cached.shape[0] == len(texts):
                self.hits += 1
                return cached
        vectors = self.embed(texts, backbone_dir, max_length, layers=layers, **embed_kwargs)
        self.misses += 1
        self.texts_embedded += len(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, vectors)
        os.replace(tmp, path)  # whole or absent: a concurrent reader never sees half a file
        path.with_suffix(".json").write_text(json.dumps(
            {"data_key": data_key, "backbone": str(backbone_dir), "max_length": max_length, "layers": layers,
             "rows": len(texts), "dim": int(vectors.shape[1])}))
        return vectors
