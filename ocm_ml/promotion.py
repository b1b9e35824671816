"""The champion gate: does a challenger replace the champion? Pure and deterministic.

Both models' figures come from one evaluation on the same rows (the family's fixed holdout). A challenger is
promoted only when it clears every floor, beats the majority-class predictor by ``baseline_margins``, beats
every reference model of ``must_beat`` (e.g. TF-IDF + logistic regression fitted on the same training split)
by its margin, and (when there is a champion) beats the champion's ``win_metric`` by at least
``win_margin``. A missing or non-finite figure never promotes, and neither does a tie.

>>> gate = Gate(floors={"accuracy": 0.85, "macro_f1": 0.80}, win_metric="accuracy", win_margin=0.01)
>>> decide({"accuracy": 0.90, "macro_f1": 0.89}, {"accuracy": 0.885, "macro_f1": 0.88}, gate).promote
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Metrics a gate may name (higher is better for each).
GATE_METRICS = ("accuracy", "macro_f1")
#: The baseline ``Gate.baseline_margins`` compares with: the training split's majority class.
MAJORITY = "majority"


@dataclass(frozen=True)
class Gate:
    """``floors``: least value of a metric; ``baseline_margins``: how far above the majority-class predictor's
    figure on the same rows (baseline ``"majority"``) a metric must be; ``must_beat``: other baselines by
    name, each with the margin per metric the challenger must beat it by (``{"tfidf_lr": {"macro_f1": 0.0}}``:
    a strictly higher macro-F1 than TF-IDF + LR); ``win_metric``/``win_margin``: the gain over the champion
    needed to replace it (absolute, in the metric's units)."""

    floors: Mapping[str, float] = field(default_factory=dict)
    baseline_margins: Mapping[str, float] = field(default_factory=dict)
    must_beat: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    win_metric: str = "accuracy"
    win_margin: float = 0.01

    def __post_init__(self) -> None:
        references = list(self.must_beat.values())
        for name in [*self.floors, *self.baseline_margins, *(m for r in references for m in r),
                     self.win_metric]:
            if name not in GATE_METRICS:
                raise ValueError(f"unknown gate metric {name!r}; known: {', '.join(GATE_METRICS)}")
        if not self.win_margin >= 0:
            raise ValueError(f"win_margin must be >= 0, got {self.win_margin}")
        for name, value in [*self.floors.items(), *self.baseline_margins.items(),
                            *(item for r in references for item in r.items())]:
            if not math.isfinite(value):
                raise ValueError(f"gate threshold for {name} must be a finite number, got {value}")
        for baseline, margins in self.must_beat.items():
            if baseline == MAJORITY:
                raise ValueError("must_beat: the majority predictor's margins go in baseline_margins")
            if any(v < 0 for v in margins.values()):
                raise ValueError(f"must_beat[{baseline!r}]: margins must be >= 0, got {dict(margins)}")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str]
    checks: list[dict] = field(default_factory=list)  # {"check", "value", "threshold", "passed"} per rule


def _finite(figures: Mapping[str, float] | None, name: str) -> float | None:
    if figures is None:
        return None
    value = figures.get(name)
    return float(value) if value is not None and math.isfinite(value) else None


def decide(
    challenger: Mapping[str, float] | None,
    champion: Mapping[str, float] | None,
    gate: Gate,
    *,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    same_version: bool = False,
) -> Decision:
    """Apply ``gate`` to the challenger's and champion's figures on the same rows (``champion`` None: there
    is no champion yet). Every rule is checked and reported, so the reasons say all that failed."""
    if same_version:
        return Decision(False, ["the challenger already is the champion"])
    checks: list[dict] = []

    def rule(name: str, value: float | None, threshold: float | None, passed: bool, reason: str) -> None:
        checks.append({"check": name, "value": value, "threshold": threshold, "passed": passed,
                       "reason": reason})

    for metric, floor in gate.floors.items():
        value = _finite(challenger, metric)
        if value is None:
            rule(f"floor {metric}", None, floor, False, f"the challenger has no finite {metric}")
        else:
            ok = value >= floor
            rule(f"floor {metric}", value, floor, ok,
                 f"{metric} {value:.4f} {'clears' if ok else 'is below'} the floor {floor:.4f}")
    required = {**({MAJORITY: dict(gate.baseline_margins)} if gate.baseline_margins else {}),
                **{name: dict(m) for name, m in gate.must_beat.items()}}
    for baseline_name, margins in required.items():
        figures = (baselines or {}).get(baseline_name)
        for metric, margin in margins.items():
            value, base = _finite(challenger, metric), _finite(figures, metric)
            if value is None or base is None:
                rule(f"{baseline_name} {metric}", value, None, False,
                     f"{metric} of the challenger or of the {baseline_name} baseline is missing")
                continue
            ok = value - base >= margin and value > base
            rule(f"{baseline_name} {metric}", value, base + margin, ok,
                 f"{metric} {value:.4f} {'beats' if ok else 'does not beat'} the {baseline_name} baseline's "
                 f"{base:.4f} by the margin {margin:.4f} (gain {value - base:+.4f})")
    if champion is not None:
        value, current = _finite(challenger, gate.win_metric), _finite(champion, gate.win_metric)
        if value is None or current is None:
            rule(f"win {gate.win_metric}", value, None, False,
                 f"{gate.win_metric} of the challenger or of the champion is missing: no comparison, "
                 "no promotion")
        else:
            gain = value - current
            ok = gain > 0 and gain >= gate.win_margin
            rule(f"win {gate.win_metric}", value, current + gate.win_margin, ok,
                 f"{gate.win_metric} {value:.4f} {'beats' if ok else 'does not beat'} the champion's "
                 f"{current:.4f} by the margin {gate.win_margin:.4f} (gain {gain:+.4f})")
    else:
        rule("first champion", None, None, True,
             "no champion yet: the first model that clears the floors wins")
    promote = all(c["passed"] for c in checks)
    failed = [c["reason"] for c in checks if not c["passed"]]
    return Decision(promote, failed if not promote else [c["reason"] for c in checks], checks)
