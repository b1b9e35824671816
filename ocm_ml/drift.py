"""Drift statistics for served traffic: input summaries, PSI and KS per feature, prediction drift,
confidence collapse. Pure numpy; no orchestrator.

The replica's prediction log (:mod:`ocm_ml.serve.prediction_log`) stores one compact summary per input,
computed by :func:`summarize_images` / :func:`summarize_texts`; the served-traffic checks compute the same
summaries of the champion's training rows and compare the two samples feature by feature::

    ref = summarize_images(train_pixels)            # (N, 784) values 0-255
    cur = summarize_images(served_pixels)
    report = input_drift(ref, cur, DriftThresholds())
    report["passed"], report["features"]["pixel_mean"]["psi"]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Bins of the per-image pixel histogram (0-255 in equal steps of 16).
HIST_BINS = 16
IMAGE_FEATURES = ("pixel_mean", "pixel_std", *(f"hist_{i:02d}" for i in range(HIST_BINS)))
TEXT_FEATURES = ("text_length", "token_count", "oov_share")
_TOKEN_RE = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class DriftThresholds:
    """When the served-traffic checks fail. PSI above ``psi`` or a KS statistic above ``ks`` on any input
    feature is input drift (0.25 is the usual "significant shift" level of PSI); a PSI of the served class
    shares against the holdout's above ``prediction_psi`` is prediction drift; a mean confidence below
    ``min_mean_confidence``, or more than ``max_low_confidence_share`` of answers under ``low_confidence``,
    is a confidence collapse. Fewer than ``min_rows`` served rows is too little to judge (the checks pass
    and say so)."""

    psi: float = 0.25
    ks: float = 0.3
    prediction_psi: float = 0.25
    min_mean_confidence: float = 0.5
    low_confidence: float = 0.5
    max_low_confidence_share: float = 0.5
    min_rows: int = 30

    def __post_init__(self) -> None:
        for name in ("psi", "ks", "prediction_psi"):
            if getattr(self, name) <= 0:
                raise ValueError(f"drift threshold {name} must be > 0, got {getattr(self, name)}")
        for name in ("min_mean_confidence", "low_confidence", "max_low_confidence_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0-1, got {getattr(self, name)}")
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {self.min_rows}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- input summaries -----------------------------------------------------------------------------------


def summarize_images(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Per image (rows of ``pixels``, values 0-255): pixel mean and std scaled to 0-1, and the share of
    pixels in each of :data:`HIST_BINS` equal bins of 0-255."""
    x = np.asarray(pixels, dtype=np.float32).reshape(len(pixels), -1)
    n, width = x.shape
    out: dict[str, np.ndarray] = {
        "pixel_mean": (x.mean(axis=1) / 255.0).astype(np.float32),
        "pixel_std": (x.std(axis=1) / 255.0).astype(np.float32),
    }
    bins = np.clip(x, 0, 255).astype(np.int32) >> 4  # 0..15
    counts = np.bincount((bins + HIST_BINS * np.arange(n, dtype=np.int32)[:, None]).ravel(),
                         minlength=HIST_BINS * n).reshape(n, HIST_BINS)
    shares = (counts / max(width, 1)).astype(np.float32)
    for i in range(HIST_BINS):
        out[f"hist_{i:02d}"] = shares[:, i]
    return out


def tokens(text: str) -> list[str]:
    """Word tokens (``\\w+``, case-folded): what token counts and OOV shares are computed over."""
    return _TOKEN_RE.findall(str(text).casefold())


def summarize_texts(texts: Sequence[str], vocabulary: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Per text: length in characters, word-token count, and the share of tokens not in ``vocabulary``
    (NaN without a vocabulary, or for a text without tokens)."""
    vocab = None if vocabulary is None else {str(w).casefold() for w in vocabulary}
    lengths, counts, oov = [], [], []
    for text in texts:
        toks = tokens(text)
        lengths.append(len(str(text)))
        counts.append(len(toks))
        if vocab is None or not toks:
            oov.append(math.nan)
        else:
            oov.append(sum(1 for t in toks if t not in vocab) / len(toks))
    return {"text_length": np.asarray(lengths, dtype=np.float32),
            "token_count": np.asarray(counts, dtype=np.float32),
            "oov_share": np.asarray(oov, dtype=np.float32)}


# --- two-sample statistics -----------------------------------------------------------------------------


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of ``current`` against ``reference``: bins at the reference's quantiles
    (ties merged), shares smoothed by ``eps``. 0 for identical distributions; > 0.25 is a large shift."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    if len(ref) == 0 or len(cur) == 0:
        raise ValueError("psi needs at least one finite value in both samples")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_share = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    cur_share = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur)
    return share_psi(ref_share, cur_share, eps)


def share_psi(ref_share: np.ndarray, cur_share: np.ndarray, eps: float = 1e-4) -> float:
    """PSI between two vectors of category shares (each summing to 1)."""
    r = np.clip(np.asarray(ref_share, dtype=np.float64), eps, None)
    c = np.clip(np.asarray(cur_share, dtype=np.float64), eps, None)
    r, c = r / r.sum(), c / c.sum()
    return float(np.sum((c - r) * np.log(c / r)))


def ks(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value."""
    ref = np.sort(np.asarray(reference, dtype=np.float64)[np.isfinite(reference)])
    cur = np.sort(np.asarray(current, dtype=np.float64)[np.isfinite(current)])
    if len(ref) == 0 or len(cur) == 0:
        raise ValueError("ks needs at least one finite value in both samples")
    grid = np.concatenate([ref, cur])
    cdf_ref = np.searchsorted(ref, grid, side="right") / len(ref)
    cdf_cur = np.searchsorted(cur, grid, side="right") / len(cur)
    stat = float(np.max(np.abs(cdf_ref - cdf_cur)))
    n = len(ref) * len(cur) / (len(ref) + len(cur))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * stat
    if lam < 1e-3:
        return stat, 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return stat, float(min(1.0, max(0.0, p)))


def _bins_for(n_current: int) -> int:
    """PSI bins for a sample: about 20 rows per bin, 2-10 bins (small samples with 10 bins read as drift)."""
    return int(min(10, max(2, n_current // 20)))


def input_drift(reference: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray],
                thresholds: DriftThresholds) -> dict[str, Any]:
    """PSI and KS of every feature both samples have (finite values); passed unless a feature is over a
    threshold. Features without finite values on either side are listed under ``skipped``."""
    features: dict[str, dict[str, Any]] = {}
    skipped = []
    n_current = 0
    for name, ref_values in reference.items():
        if name not in current:
            continue
        ref = np.asarray(ref_values, dtype=np.float64)
        cur = np.asarray(current[name], dtype=np.float64)
        ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
        if len(ref) == 0 or len(cur) == 0:
            skipped.append(name)
            continue
        n_current = max(n_current, len(cur))
        p = psi(ref, cur, bins=_bins_for(len(cur)))
        stat, pvalue = ks(ref, cur)
        features[name] = {
            "psi": round(p, 4), "ks": round(stat, 4), "ks_pvalue": float(f"{pvalue:.3g}"),
            "reference_mean": round(float(ref.mean()), 4), "served_mean": round(float(cur.mean()), 4),
            "drifted": bool(p > thresholds.psi or stat > thresholds.ks),
        }
    drifted = sorted(k for k, v in features.items() if v["drifted"])
    enough = n_current >= thresholds.min_rows
    return {
        "passed": not (enough and drifted),
        "enough_rows": enough,
        "rows": n_current,
        "drifted": drifted,
        "max_psi": max((v["psi"] for v in features.values()), default=0.0),
        "max_ks": max((v["ks"] for v in features.values()), default=0.0),
        "features": features,
        "skipped": skipped,
    }


def prediction_drift(reference_labels: Sequence[str], served_labels: Sequence[str],
                     thresholds: DriftThresholds) -> dict[str, Any]:
    """The served class shares against the reference's (the holdout's labels): PSI and total variation."""
    classes = sorted({*map(str, reference_labels), *map(str, served_labels)})
    if not len(reference_labels):
        raise ValueError("prediction drift needs reference labels (the holdout is empty)")
    ref = np.array([sum(1 for x in reference_labels if str(x) == c) for c in classes], dtype=np.float64)
    cur = np.array([sum(1 for x in served_labels if str(x) == c) for c in classes], dtype=np.float64)
    n = int(cur.sum())
    ref_share = ref / ref.sum()
    cur_share = cur / n if n else np.zeros_like(ref)
    value = share_psi(ref_share, cur_share) if n else 0.0
    enough = n >= thresholds.min_rows
    return {
        "passed": not (enough and value > thresholds.prediction_psi),
        "enough_rows": enough,
        "rows": n,
        "psi": round(value, 4),
        "total_variation": round(float(0.5 * np.abs(ref_share - cur_share).sum()), 4) if n else 0.0,
        "reference_shares": {c: round(float(s), 4) for c, s in zip(classes, ref_share, strict=True)},
        "served_shares": {c: round(float(s), 4) for c, s in zip(classes, cur_share, strict=True)},
    }


def confidence_collapse(confidences: Sequence[float], thresholds: DriftThresholds) -> dict[str, Any]:
    """Mean confidence and the share of answers under ``thresholds.low_confidence``."""
    conf = np.asarray(confidences, dtype=np.float64)
    conf = conf[np.isfinite(conf)]
    n = len(conf)
    mean = float(conf.mean()) if n else math.nan
    low = float((conf < thresholds.low_confidence).mean()) if n else math.nan
    enough = n >= thresholds.min_rows
    collapsed = enough and (mean < thresholds.min_mean_confidence
                            or low > thresholds.max_low_confidence_share)
    return {
        "passed": not collapsed,
        "enough_rows": enough,
        "rows": n,
        "mean_confidence": round(mean, 4) if n else None,
        "low_confidence_share": round(low, 4) if n else None,
        "p10_confidence": round(float(np.quantile(conf, 0.1)), 4) if n else None,
    }
