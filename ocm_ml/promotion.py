"""The champion gate: does a challenger model replace the champion? Pure and deterministic."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    challenger: float | None = None
    champion: float | None = None


def decide_promotion(
    challenger: float | None,
    champion: float | None,
    *,
    floor: float,
    margin: float,
    mode: Literal["max", "min"] = "max",
    metric: str = "val_accuracy",
    same_version: bool = False,
) -> Decision:
    """Promote only a challenger that clears the absolute ``floor`` and beats the champion by at least
    ``margin`` (absolute, in the metric's units; ``mode="min"`` for losses). The first model of a family
    (no champion) is promoted when it clears the floor. A worse or equal challenger never is."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if same_version:
        return Decision(False, ["the challenger already is the champion"], challenger, champion)
    if challenger is None or not math.isfinite(challenger):
        return Decision(False, [f"the challenger has no finite {metric}"], challenger, champion)
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    if not (better(challenger, floor) or challenger == floor):
        word = "below" if mode == "max" else "above"
        return Decision(False, [f"{metric} {challenger:.4f} is {word} the floor {floor:.4f}"], challenger, champion)
    if champion is None or not math.isfinite(champion):
        return Decision(True, [f"first champion: {metric} {challenger:.4f} clears the floor {floor:.4f}"],
                        challenger, champion)
    gain = challenger - champion if mode == "max" else champion - challenger
    if gain > 0 and gain >= margin:
        return Decision(True, [f"{metric} {challenger:.4f} beats the champion's {champion:.4f} by {gain:.4f} "
                               f"(margin {margin:.4f})"], challenger, champion)
    return Decision(False, [f"{metric} {challenger:.4f} does not beat the champion's {champion:.4f} by the margin "
                            f"{margin:.4f} (gain {gain:+.4f})"], challenger, champion)
