"""Plots as PNG bytes (matplotlib, headless): training curves, confusion matrices, served-traffic drift."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def training_curve_png(history: Sequence[dict], title: str) -> bytes:
    """Loss and accuracy per epoch (train and val) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(h.get("epoch", i))
              + (0 if "epoch" in h and min(x.get("epoch", 1) for x in history) >= 1 else 1)
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


def confusion_png(matrices: dict[str, Sequence[Sequence[int]]], class_names: Sequence[str],
                  title: str) -> bytes:
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


# --- served traffic (ocm_assets/monitoring.py) ---


def _drift_figure(width: float = 7.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 1, figsize=(width, height), dpi=90)


def input_drift_png(report: dict[str, Any], threshold: float, title: str) -> bytes:
    fig, ax = _drift_figure(max(6.0, 0.4 * len(report["features"]) + 2))
    names = list(report["features"])
    values = [report["features"][n]["psi"] for n in names]
    ax.bar(range(len(names)), values, color=["tab:red" if report["features"][n]["drifted"] else "tab:blue"
                                             for n in names])
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("PSI")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def prediction_drift_png(report: dict[str, Any], title: str) -> bytes:
    import numpy as np

    fig, ax = _drift_figure()
    classes = list(report["reference_shares"])
    x = np.arange(len(classes))
    ax.bar(x - 0.2, [report["reference_shares"][c] for c in classes], 0.4, label="holdout")
    ax.bar(x + 0.2, [report["served_shares"][c] for c in classes], 0.4, label="served")
    ax.set_xticks(x, [c if len(c) <= 10 else c[:9] + "." for c in classes], rotation=60, fontsize=7)
    ax.set_ylabel("share")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def confidence_png(confidences, low: float, title: str) -> bytes:
    fig, ax = _drift_figure()
    ax.hist(list(confidences), bins=20, range=(0, 1), color="tab:blue")
    ax.axvline(low, color="black", linestyle="--", linewidth=1, label=f"low confidence < {low}")
    ax.set_xlabel("confidence")
    ax.set_ylabel("answers")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _png(fig)
