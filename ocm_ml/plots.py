"""Training-curve plots as PNG bytes (matplotlib, headless)."""

from __future__ import annotations

import io
from collections.abc import Sequence


def training_curve_png(history: Sequence[dict], title: str) -> bytes:
    """Loss and accuracy per epoch (train and val) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(h.get("epoch", i)) + (0 if "epoch" in h and min(x.get("epoch", 1) for x in history) >= 1 else 1)
              for i, h in enumerate(history)]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90)
    for key, ax, label in (("train_loss", ax_loss, "train"), ("val_loss", ax_loss, "val"),
                           ("train_accuracy", ax_acc, "train"), ("val_accuracy", ax_acc, "val")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(epochs, [v if v is not None else float("nan") for v in values], marker="o", label=label)
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def confusion_png(matrices: dict[str, Sequence[Sequence[int]]], class_names: Sequence[str], title: str) -> bytes:
    """Confusion matrices (rows: true class, columns: predicted), one panel per model, row-normalized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.0), dpi=90, squeeze=False)
    for ax, (label, matrix) in zip(axes[0], matrices.items(), strict=True):
        cm = np.asarray(matrix, dtype=float)
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(cm):
            if count:
                ax.text(j, i, int(count), ha="center", va="center", fontsize=6,
                        color="white" if share[i, j] > 0.5 else "black")
        ticks = range(len(class_names))
        short = [c if len(c) <= 8 else c[:7] + "." for c in class_names]
        ax.set_xticks(ticks, short, rotation=90, fontsize=7)
        ax.set_yticks(ticks, short, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
