"""Dataset families: declared once here. A family of an existing kind is one more line, not new asset code.

``name`` is the asset-key prefix (``fashion_mnist/dataset``), ``dataset`` the registry folder and tag prefix
(``fashion-mnist-v1.0.0``), ``kind`` picks the asset factories (``image``: normalization + DDP training;
``text``: label map + Tune search).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["image", "text"]


@dataclass(frozen=True)
class Family:
    name: str
    dataset: str
    kind: Kind
    description: str
    # Optional scheduled retraining of the newest version (the schedule is STOPPED until turned on in the UI).
    retrain_cron: str = "0 3 * * 1"

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
    Family("fashion_mnist", "fashion-mnist", "image", "Fashion-MNIST 28x28 grey images, 10 classes"),
    Family("tweet_sentiment", "tweet-sentiment", "text", "Short tweets labelled negative/neutral/positive"),
)


def family(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
