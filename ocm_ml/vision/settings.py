"""How the image model trains: :class:`TrainSettings`, the one place its fields, defaults, descriptions and
rules live. Pure Python (no torch, no Ray), so the Dagster config that wraps it loads fast; the driver
(:func:`ocm_ml.vision.train.train_fashion_mnist`) checks it once with :func:`validate_settings` and sends it
to the Ray Train workers, which rebuild it with ``TrainSettings(**sent)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Learning-rate schedules of the image model (see ``lightning_module.one_cycle``).
LR_SCHEDULES = ("onecycle", "constant")
DEFAULT_LR_SCHEDULE = "onecycle"
#: Formats DDP all-reduces gradients in (``train.comm_hook``).
GRADIENT_COMPRESSION = ("bf16", "fp16", "none")


def _setting(default, description: str):
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True)
class TrainSettings:
    """How to train: scale, batch and optimiser. The defaults finish on 2 CPU cores."""

    num_workers: int = _setting(2, "Ray Train workers (DDP processes).")
    cpus_per_worker: int = _setting(1, "CPUs reserved per worker.")
    gpus_per_worker: int = _setting(0, "GPUs per worker (0: CPU training).")
    batch_size: int = _setting(128, "Per-worker batch size (the global batch is num_workers x batch_size).")
    learning_rate: float = _setting(1e-3, "Adam learning rate (the peak of the one-cycle schedule).")
    epochs: int = _setting(1, "Epochs over the training split.")
    row_limit: int | None = _setting(
        None, "Read only the first N rows of each of the train and val splits (quick runs); None: every row.")
    seed: int = _setting(0, "Seed for weights, shuffling and sampling.")
    max_failures: int = _setting(
        2, "Worker-group restarts after a worker failure (from the last checkpoint) before giving up; -1: "
        "unlimited.")
    lr_schedule: str = _setting(
        DEFAULT_LR_SCHEDULE, "onecycle (warm up to learning_rate, cosine down to 1 %) or constant.")
    prefetch_batches: int = _setting(1, "Batches Ray Data prepares ahead in each worker.")
    gradient_compression: str = _setting(
        "bf16", "Format DDP all-reduces gradients in: bf16 or fp16 (half the bytes per step, cast back to "
        "float32 before Adam; fp16 can overflow) or none (float32).")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


def validate_settings(settings: TrainSettings, cluster_resources: dict) -> None:
    """Fail fast, before anything is scheduled, on settings that cannot work on this cluster.

    ``cluster_resources`` is what ``ray.cluster_resources()`` returns (``{"CPU": 2.0, ...}``). Raises
    ``ValueError`` saying what was asked, what the cluster has and what to change.
    """
    problems: list[str] = []
    if settings.num_workers < 1:
        problems.append(
            f"num_workers={settings.num_workers}: need at least 1 training worker; set num_workers >= 1."
        )
    if settings.cpus_per_worker < 0 or settings.gpus_per_worker < 0:
        problems.append(
            f"cpus_per_worker={settings.cpus_per_worker}, gpus_per_worker={settings.gpus_per_worker}: "
            "resources per worker cannot be negative."
        )
    if settings.cpus_per_worker == 0 and settings.gpus_per_worker == 0:
        problems.append("cpus_per_worker=0 and gpus_per_worker=0: each worker needs a CPU or a GPU.")
    if settings.batch_size < 1:
        problems.append(f"batch_size={settings.batch_size}: must be >= 1 (it is per worker).")
    if settings.epochs < 1:
        problems.append(f"epochs={settings.epochs}: must be >= 1.")
    if not settings.learning_rate > 0:
        problems.append(f"learning_rate={settings.learning_rate}: must be > 0.")
    if settings.row_limit is not None and settings.row_limit < 1:
        problems.append(f"row_limit={settings.row_limit}: must be >= 1, or None for every row.")
    if settings.lr_schedule not in LR_SCHEDULES:
        problems.append(f"lr_schedule={settings.lr_schedule!r}: must be one of {', '.join(LR_SCHEDULES)}.")
    if settings.gradient_compression not in GRADIENT_COMPRESSION:
        problems.append(
            f"gradient_compression={settings.gradient_compression!r}: must be one of "
            f"{', '.join(GRADIENT_COMPRESSION)}."
        )
    if settings.prefetch_batches < 0:
        problems.append(f"prefetch_batches={settings.prefetch_batches}: must be >= 0.")
    if settings.max_failures < -1:
        problems.append(f"max_failures={settings.max_failures}: must be >= 0 (or -1 for unlimited retries).")
    if problems:
        raise ValueError("Invalid training settings: " + " ".join(problems))

    workers = settings.num_workers
    # The Train controller runs with num_cpus=0, so the driver side adds nothing to the request.
    want_cpus = workers * settings.cpus_per_worker
    have_cpus = float(cluster_resources.get("CPU", 0))
    if want_cpus > have_cpus:
        fit = int(have_cpus // settings.cpus_per_worker) if settings.cpus_per_worker else 0
        raise ValueError(
            f"Training asks for {want_cpus} CPUs ({workers} workers x {settings.cpus_per_worker} CPU each) "
            f"but the Ray cluster has {have_cpus:g} CPUs in total. Lower num_workers to {max(fit, 0)} or "
            "fewer, lower cpus_per_worker, or use a bigger cluster."
        )
    want_gpus = workers * settings.gpus_per_worker
    have_gpus = float(cluster_resources.get("GPU", 0))
    if want_gpus > have_gpus:
        raise ValueError(
            f"Training asks for {want_gpus} GPUs ({workers} workers x {settings.gpus_per_worker} GPU each) "
            f"but the Ray cluster has {have_gpus:g} GPUs. Set gpus_per_worker=0 to train on CPUs, lower "
            "num_workers, or use a cluster with GPUs."
        )
