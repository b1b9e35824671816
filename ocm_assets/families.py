"""Dataset families: declared once here. A family of an existing kind is one more line, not new asset code.

``name`` is the asset-key prefix (``fashion_mnist/dataset``), ``dataset`` the registry folder and tag prefix
(``fashion-mnist-v1.0.0``), ``kind`` picks the asset factories (``image``: normalization + DDP training;
``text``: label map + Tune search).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ocm_ml.promotion import Gate

Kind = Literal["image", "text"]

#: The seeds' promotion rules. Images: absolute floors on the holdout; texts: a floor above the majority-class
#: predictor on the same rows and a higher macro-F1 than TF-IDF + LR fitted on the training split. Both: beat
#: the champion by one point on the holdout.
IMAGE_GATE = Gate(floors={"accuracy": 0.85, "macro_f1": 0.80}, win_metric="accuracy", win_margin=0.01)
TEXT_GATE = Gate(baseline_margins={"accuracy": 0.10}, must_beat={"tfidf_lr": {"macro_f1": 0.0}},
                 win_metric="macro_f1", win_margin=0.01)


@dataclass(frozen=True)
class Family:
    name: str
    dataset: str
    kind: Kind
    description: str
    # Optional scheduled retraining of the newest version (the schedule is STOPPED until turned on in the UI).
    retrain_cron: str = "0 3 * * 1"
    # Promotion: the gate's defaults (overridable per run in the champion's config).
    gate: Gate = field(default_factory=Gate, hash=False, compare=False)

    @property
    def partitions_name(self) -> str:
        return f"{self.name}_versions"

    @property
    def retrain_job_name(self) -> str:
        return f"{self.name}_retrain"

    @property
    def sensor_name(self) -> str:
        return f"{self.name}_registry_sensor"

    @property
    def schedule_name(self) -> str:
        return f"{self.name}_scheduled_retrain"


FAMILIES: tuple[Family, ...] = (
    Family("fashion_mnist", "fashion-mnist", "image", "Fashion-MNIST 28x28 grey images, 10 classes",
           gate=IMAGE_GATE),
    Family("tweet_sentiment", "tweet-sentiment", "text", "Short tweets labelled negative/neutral/positive",
           gate=TEXT_GATE),
)


def family(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
