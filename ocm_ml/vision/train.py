"""Distributed data-parallel training of the Fashion-MNIST ResNet18 on Ray Train (V2) with Lightning.

The caller initialises Ray and hands over parquet locations (registry schema: ``image`` list<uint8> of 784
row-major 28x28 pixels in 0-255, ``label`` int64), the data version's normalization mean/std, and where to
keep checkpoints:

>>> result = train_fashion_mnist(
...     "/remote/ab/cdef.parquet", "/remote/12/3456.parquet", mean=0.286, std=0.353,
...     settings=TrainSettings(num_workers=2, epochs=3), storage_path="/tmp/ray-results",
...     run_name="fashion-mnist-v1.0.0-abc123", on_epoch=print)
>>> result.val_accuracy, result.checkpoint_path, result.load_model()

How it fits together:

- Data is streamed: ``ray.data.read_parquet`` on the driver, split across workers by Ray Train
  (``get_dataset_shard``), and iterated in each worker with ``iter_torch_batches``; pixels are normalized in
  the collate function, a batch at a time. No worker ever holds the whole data set.
- Each worker runs a plain ``lightning.Trainer`` with Ray's DDP strategy and environment; Ray's report
  callback saves a checkpoint at the end of every epoch. After a worker dies, Ray restarts the group (up to
  ``max_failures`` times) and the loop resumes from the latest checkpoint.
- Per-epoch progress reaches the caller while training runs: a Ray Train ``UserCallback`` (it runs in the
  Train controller and sees every worker's metrics) puts one aggregated record per epoch on a
  ``ray.util.queue.Queue``; the driver runs ``trainer.fit()`` in a thread and calls ``on_epoch`` from the
  calling thread as records arrive.
- A run is identified by ``storage_path/run_name``: starting a run whose folder already holds a Ray Train
  run resumes that run (Ray Train's behaviour), so give every new run a new name.
- Settings travel whole: the driver checks :class:`~ocm_ml.vision.settings.TrainSettings` once
  (``validate_settings``) and sends its fields; each worker rebuilds the same object from them.
"""

from __future__ import annotations

import logging
import math
import os
import queue as std_queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass, field
from typing import Any, ClassVar, cast

import lightning
import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.train.v2.api.callback import UserCallback
from torch import nn

from ocm_ml.contract import check_normalization
from ocm_ml.vision.lightning_module import LIGHTNING_CHECKPOINT_NAME, ImageClassifier, load_network
from ocm_ml.vision.model import normalize_pixels
from ocm_ml.vision.settings import GRADIENT_COMPRESSION, TrainSettings, validate_settings

__all__ = ["EPOCH_KEYS", "TrainResult", "TrainSettings", "train_fashion_mnist", "validate_settings"]

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
IMAGE_PIXELS = 28 * 28
EPOCH_KEYS = (
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second",
    "data_wait_fraction",
)
_FAILURE_TEXT_LIMIT = 2000
# The driver blocks on the progress queue for up to this long between events. ``fit()`` returning puts
# ``_FIT_RETURNED`` on the queue, so the wait never delays the end of a run; a longer wait means fewer
# wake-ups of the driver and the queue actor, which share the CPUs with the training workers.
_EVENT_WAIT_S = 30.0
_FIT_RETURNED = {"kind": "fit-returned"}
DATA_TASK_CPUS = 0  # logical CPUs per Ray Data read task; see _read_images
# Gradients live in DDP's communication buckets: no copy of the 45 MB of ResNet18 gradients per step.
DDP_KWARGS = {"gradient_as_bucket_view": True}
# gradient_compression -> torch's DDP communication hook (default_hooks.<name>); "none": plain float32
_COMM_HOOKS = {"bf16": "bf16_compress_hook", "fp16": "fp16_compress_hook", "none": None}


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------


def pixels_from_arrow(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<uint8> column of 784-value rows -> uint8 array (N, 784), without a Python loop over rows."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = array.flatten().to_numpy(zero_copy_only=False)
    if values.size != len(array) * IMAGE_PIXELS:
        raise ValueError(
            f"image rows must hold {IMAGE_PIXELS} pixels each; got {values.size} values for {len(array)} rows"
        )
    return values.reshape(len(array), IMAGE_PIXELS)


class ImageBatchCollate(ArrowBatchCollateFn):
    """Arrow batch (image, label) -> (normalized float (N, 1, 28, 28), int64 labels (N,))."""

    def __init__(self, mean: float, std: float):
        self.mean = float(mean)
        self.std = float(std)

    def __call__(self, batch: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        # astype copies: arrow buffers are read-only, torch wants writable memory.
        pixels = torch.from_numpy(pixels_from_arrow(batch.column("image")).astype(np.float32))
        labels = torch.from_numpy(np.array(batch.column("label").to_numpy(), dtype=np.int64))
        return normalize_pixels(pixels, self.mean, self.std), labels


class _EpochThroughput(lightning.Callback):
    """Logs training images/s for the epoch, summed over workers (data loading included, validation not), and
    the share of that time a worker spent waiting for its next batch (``data_wait_fraction``, mean over
    workers): near 0 when the input pipeline keeps up, large when training is input-bound."""

    def on_train_epoch_start(self, trainer, pl_module):
        self._images = 0
        self._start = time.perf_counter()
        self._last = self._start
        self._waited = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._waited += time.perf_counter() - self._last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._images += len(batch[1])
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        seconds = max(self._last - self._start, 1e-9)
        rate = self._images / seconds if self._images else 0.0
        pl_module.log("images_per_second", rate, reduce_fx="sum", sync_dist=True)
        pl_module.log("train_images", float(self._images), reduce_fx="sum", sync_dist=True)
        pl_module.log("data_wait_fraction", self._waited / seconds, reduce_fx="mean", sync_dist=True)


def comm_hook(compression: str):
    """The DDP communication hook for ``compression`` (``GRADIENT_COMPRESSION``), or None for plain float32.

    With one CPU per worker the all-reduce of ResNet18's 45 MB of gradients competes with the backward pass
    for the same core; sending them as 16-bit halves that work (``benchmarks/ddp_vs_single.py`` measures it).
    bf16 keeps float32's range, so no gradient overflows; fp16 keeps more mantissa bits but can overflow.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if compression not in _COMM_HOOKS:
        raise ValueError(f"gradient_compression must be one of {GRADIENT_COMPRESSION}, got {compression!r}")
    name = _COMM_HOOKS[compression]
    return getattr(default_hooks, name) if name else None


def _ddp_strategy(compression: str, ddp_kwargs: dict | None = None):
    """Ray's DDP strategy with the gradient communication hook registered on any device.

    Lightning's ``DDPStrategy`` registers ``ddp_comm_hook`` only on CUDA; gloo (CPU) runs the same hooks.
    """
    from ray.train.lightning import RayDDPStrategy

    class _RayDDPStrategy(RayDDPStrategy):
        def _register_ddp_hooks(self) -> None:
            if getattr(self.model, "device_ids", None):  # DDP on CUDA devices: Lightning's own path
                super()._register_ddp_hooks()
            elif self._ddp_comm_hook is not None:  # CPU (gloo): DDP has no device_ids
                self.model.register_comm_hook(self._ddp_comm_state, self._ddp_comm_hook)

    kwargs = DDP_KWARGS if ddp_kwargs is None else ddp_kwargs
    return _RayDDPStrategy(ddp_comm_hook=comm_hook(compression), **kwargs)


def worker_config(settings: TrainSettings, mean: float, std: float,
                  total_steps: int | None) -> dict[str, Any]:
    """What the driver sends every worker: the settings' fields whole, the normalization, the number of
    classes and the schedule's step count (None: no schedule needs it)."""
    return {"settings": asdict(settings), "mean": float(mean), "std": float(std), "num_classes": NUM_CLASSES,
            "total_steps": total_steps}


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker; ``config`` is :func:`worker_config`'s."""
    import ray.train
    from ray.train.lightning import (
        RayLightningEnvironment,
        RayTrainReportCallback,
        prepare_trainer,
    )

    settings = TrainSettings(**config["settings"])
    lightning.seed_everything(settings.seed, workers=True, verbose=False)
    # Ray sets OMP_NUM_THREADS from the worker's CPUs; make torch agree even if it was imported earlier.
    torch.set_num_threads(max(settings.cpus_per_worker, 1))

    collate = ImageBatchCollate(config["mean"], config["std"])
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    assert train_shard is not None and val_shard is not None  # the trainer is given both datasets
    train_batches = train_shard.iter_torch_batches(
        batch_size=settings.batch_size, collate_fn=collate, prefetch_batches=settings.prefetch_batches,
    )
    val_batches = val_shard.iter_torch_batches(
        batch_size=settings.batch_size, collate_fn=collate
    )

    module = ImageClassifier(
        num_classes=config["num_classes"], learning_rate=settings.learning_rate,
        lr_schedule=settings.lr_schedule, total_steps=config["total_steps"],
    )
    trainer = lightning.Trainer(
        max_epochs=settings.epochs,
        accelerator="gpu" if settings.use_gpu else "cpu",
        devices="auto",
        strategy=_ddp_strategy(settings.gradient_compression),
        plugins=[RayLightningEnvironment()],
        callbacks=[_EpochThroughput(), RayTrainReportCallback()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    trainer = prepare_trainer(trainer)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.fit(module, train_dataloaders=train_batches, val_dataloaders=val_batches)
        return
    with checkpoint.as_directory() as folder:
        ckpt_path = os.path.join(folder, LIGHTNING_CHECKPOINT_NAME)
        logger.info("resuming from %s", ckpt_path)
        trainer.fit(module, train_dataloaders=train_batches, val_dataloaders=val_batches, ckpt_path=ckpt_path)


# ---------------------------------------------------------------------------------------------------------
# Controller side: progress events
# ---------------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def aggregate_worker_metrics(metrics_per_worker: list[dict[str, Any]]) -> dict[str, float]:
    """One epoch record from every worker's reported metrics.

    Losses and accuracies are already averaged over all workers by Lightning (``sync_dist``/torchmetrics) and
    throughput already summed, so each worker holds the same values; the mean here only guards against a
    worker that reports something different.
    """
    record: dict[str, float] = {}
    for key in (*EPOCH_KEYS, "train_images"):
        values = [float(m[key]) for m in metrics_per_worker if key in m]
        record[key] = _mean(values)
    record["epoch"] = int(record["epoch"]) if record["epoch"] == record["epoch"] else -1
    return record


class _ProgressCallback(UserCallback):
    """Runs in the Ray Train controller actor; forwards epochs and worker failures to the driver's queue."""

    def __init__(self, events):
        self._events = events

    def _put(self, item: dict) -> None:
        # Fire and forget: the controller's event loop must not block on the queue actor.
        self._events.actor.put_nowait.remote(item)

    def after_report(self, run_context, metrics, checkpoint):
        record = aggregate_worker_metrics(metrics)
        self._put({"kind": "epoch", "record": record, "checkpoint": checkpoint.path if checkpoint else None})

    def after_exception(self, run_context, worker_exceptions):
        errors = {int(rank): str(exc)[:_FAILURE_TEXT_LIMIT] for rank, exc in worker_exceptions.items()}
        self._put({"kind": "failure", "errors": errors, "time": time.time()})


# ---------------------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished run produced. Metrics are the best checkpoint's (highest ``val_accuracy``).

    ``history`` holds one record per epoch (keys ``EPOCH_KEYS``), aggregated over workers;
    ``images_per_second`` is the training throughput of all workers together, averaged over epochs;
    ``train_rows`` is the number of training images one epoch went through (after ``row_limit``; Ray's equal
    split across workers may drop up to ``num_workers - 1`` rows); ``failures`` has one entry per worker
    failure Ray Train recovered from (or gave up on). ``load_model()`` returns the trained network.
    """

    val_accuracy: float
    val_loss: float
    history: list[dict[str, float]]
    checkpoint_path: str
    images_per_second: float
    num_workers: int
    train_rows: int
    elapsed_seconds: float
    run_path: str = ""
    failures: list[str] = field(default_factory=list)
    storage_filesystem: Any = field(default=None, repr=False, compare=False)

    #: The fields :meth:`to_dict` writes (everything but the filesystem handle).
    DICT_FIELDS: ClassVar[tuple[str, ...]] = (
        "val_accuracy", "val_loss", "history", "checkpoint_path", "images_per_second", "num_workers",
        "train_rows", "elapsed_seconds", "run_path", "failures",
    )

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values (the training driver of a Ray Job writes it, the step reads it)."""
        return {name: getattr(self, name) for name in self.DICT_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], storage_filesystem=None) -> TrainResult:
        """The result :meth:`to_dict` wrote; ``storage_filesystem`` is where its checkpoint lives."""
        missing = [name for name in cls.DICT_FIELDS if name not in data]
        if missing:
            raise ValueError(f"training result lacks {missing}: was it written by TrainResult.to_dict?")
        return cls(**{name: data[name] for name in cls.DICT_FIELDS}, storage_filesystem=storage_filesystem)

    def load_model(self) -> nn.Module:
        """The trained ResNet18 (plain ``nn.Module``, CPU, eval mode) from the best checkpoint."""
        from ray.train import Checkpoint

        checkpoint = Checkpoint(self.checkpoint_path, filesystem=self.storage_filesystem)
        with checkpoint.as_directory() as folder:
            return load_network(folder)


def _data_filesystem(url: str, data_filesystem, storage_filesystem):
    if data_filesystem is not None:
        return data_filesystem
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return storage_filesystem if scheme not in ("", "file", "local") else None


def _read_images(url: str, filesystem, row_limit: int | None):
    """A lazy, streamed dataset of the parquet file(s) at ``url`` (first ``row_limit`` rows when set).

    Read tasks reserve no logical CPU (``DATA_TASK_CPUS``): the training workers may hold every CPU of the
    cluster (2 workers x 1 CPU on a 2-CPU node), and Ray Train gives Ray Data only what the workers leave, so
    1-CPU read tasks would wait forever. Ray Data's DataSourceV2 parquet path adds a ``ListFiles`` stage
    that always asks for 1 CPU, so the read goes through the V1 datasource, whose tasks honour ``num_cpus``.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        # file_extensions=None: DVC remotes store files by md5, without a .parquet suffix, and Ray Data would
        # otherwise skip them silently (an empty dataset, and no metrics).
        dataset = ray.data.read_parquet(
            url, filesystem=filesystem, columns=["image", "label"], num_cpus=DATA_TASK_CPUS,
            file_extensions=None,
        )
    finally:
        context.use_datasource_v2 = previous
    return dataset.limit(row_limit) if row_limit is not None else dataset


def _ordered_ingest(data_config_cls):
    """Ray Train's default ingest, with blocks kept in file order.

    Streaming execution otherwise hands blocks to the workers' shards in whatever order tasks finish, so the
    same partition and seed could train on differently ordered (and differently split) batches. With the order
    preserved, a re-materialization reproduces the same run on CPU (the reproducibility test checks it).
    """
    options = data_config_cls.default_ingest_options()
    options.preserve_order = True
    return data_config_cls(execution_options=options)


def _drain(events, timeout: float) -> list[dict]:
    try:
        first = events.get(block=True, timeout=timeout)
    except std_queue.Empty:
        return []
    rest = events.get_nowait_batch(events.qsize()) if events.qsize() else []
    return [first, *rest]


def train_fashion_mnist(
    train_url: str,
    val_url: str,
    mean: float,
    std: float,
    settings: TrainSettings,
    storage_path: str,
    run_name: str,
    storage_filesystem=None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    *,
    data_filesystem=None,
) -> TrainResult:
    """Train the ResNet18 with DDP on Ray Train and return the best checkpoint and its metrics.

    Ray must already be initialised. ``storage_filesystem`` (a ``pyarrow.fs.FileSystem``) is where
    ``storage_path`` lives (e.g. S3 for checkpoints); the parquet files are read with ``data_filesystem`` when
    given, else with ``storage_filesystem`` when their URL has a remote scheme (``s3://``), else with the
    filesystem pyarrow infers. ``on_epoch(record)`` is called from this thread after every epoch, while
    training goes on; ``record`` has the keys ``EPOCH_KEYS``.

    Raises ``ValueError`` for settings the cluster cannot run, ``RuntimeError`` when training fails after
    ``settings.max_failures`` restarts (with Ray's error text).
    """
    import ray
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    if not ray.is_initialized():
        raise RuntimeError(
            "Ray is not initialised: call ray.init(...) (or use the Ray resource) before training."
        )
    validate_settings(settings, ray.cluster_resources())
    mean, std = astuple(check_normalization({"mean": mean, "std": std}, where="train_fashion_mnist"))

    train_ds = _read_images(
        train_url, _data_filesystem(train_url, data_filesystem, storage_filesystem), settings.row_limit
    )
    val_ds = _read_images(
        val_url, _data_filesystem(val_url, data_filesystem, storage_filesystem), settings.row_limit
    )

    # The schedule needs the steps up front (Ray Data iterators have no length): every worker gets an equal
    # share of the rows (Train's streaming_split(equal=True)), so steps = ceil(rows / workers / batch).
    total_steps = None
    if settings.lr_schedule == "onecycle":
        rows = train_ds.count()
        per_worker = rows // settings.num_workers
        total_steps = settings.epochs * max(1, math.ceil(per_worker / settings.batch_size))

    resources = {"CPU": settings.cpus_per_worker}
    if settings.use_gpu:
        resources["GPU"] = settings.gpus_per_worker
    events = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(settings, mean, std, total_steps),
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers, use_gpu=settings.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_accuracy", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            callbacks=[_ProgressCallback(events)],
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=_ordered_ingest(DataConfig),
    )

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the calling thread below
            outcome["error"] = exc
        finally:
            # Wakes the loop below at once, so it can wait on the queue without polling.
            try:
                events.put_nowait(_FIT_RETURNED)
            except Exception:  # the queue actor went down with the cluster; the loop notices the thread
                pass

    history: dict[int, dict[str, float]] = {}
    train_rows = 0
    failures: list[str] = []
    callback_error: BaseException | None = None

    def handle(event: dict) -> None:
        nonlocal callback_error, train_rows
        if event["kind"] == "failure":
            for rank, text in sorted(event["errors"].items()):
                failures.append(f"worker rank {rank}: {text}")
            return
        record = {k: event["record"][k] for k in EPOCH_KEYS}
        images = event["record"].get("train_images", float("nan"))
        if images == images:
            train_rows = max(train_rows, int(images))
        history[record["epoch"]] = record  # a retried epoch replaces the earlier record
        if on_epoch is not None and callback_error is None:
            try:
                on_epoch(dict(record))
            except Exception as exc:  # keep training; re-raised once fit() has returned
                callback_error = exc

    started = time.perf_counter()
    thread = threading.Thread(target=fit, name=f"ray-train-{run_name}", daemon=True)
    thread.start()
    try:
        returned = False
        while not returned:
            batch = _drain(events, timeout=_EVENT_WAIT_S)
            for event in batch:
                if event == _FIT_RETURNED:
                    returned = True
                else:
                    handle(event)
            if not batch and not thread.is_alive():
                break
        thread.join()
        # The callback's puts are fire-and-forget: give the last ones a moment to land.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            batch = _drain(events, timeout=0.2)
            if not batch:
                break
            for event in batch:
                handle(event)
    finally:
        elapsed = time.perf_counter() - started
        try:
            ray.kill(cast(Any, events.actor))  # cast: a Queue always has its actor (typed Optional)
        except Exception:  # the queue actor may already be gone with a dying cluster
            pass

    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, ray.train.TrainingFailedError):
            raise RuntimeError(
                f"Training run {run_name!r} failed after {len(failures)} worker failure(s) "
                f"(max_failures={settings.max_failures}): {exc}"
            ) from exc
        raise exc
    if callback_error is not None:
        raise RuntimeError(f"on_epoch callback failed: {callback_error!r}") from callback_error

    result = outcome["result"]
    # Highest val_accuracy; among equals the lowest val_loss (what CheckpointConfig's score alone cannot say).
    best = max(
        result.best_checkpoints or [],
        key=lambda pair: (pair[1].get("val_accuracy", float("-inf")), -pair[1].get("val_loss", float("inf"))),
        default=None,
    )
    if best is None:
        raise RuntimeError(f"Training run {run_name!r} finished without reporting a checkpoint.")
    best_checkpoint, best_metrics = best
    best_epoch = int(best_metrics.get("epoch", -1))
    best_record = history.get(best_epoch, {})
    reported = cast("dict[str, float]", best_metrics)  # cast: Ray types them Any; the workers report floats
    ordered = [history[e] for e in sorted(history)]
    rates = [r["images_per_second"] for r in ordered if r["images_per_second"] == r["images_per_second"]]
    return TrainResult(
        val_accuracy=float(best_record.get("val_accuracy", reported.get("val_accuracy", float("nan")))),
        val_loss=float(best_record.get("val_loss", reported.get("val_loss", float("nan")))),
        history=ordered,
        checkpoint_path=str(best_checkpoint.path),
        images_per_second=_mean(rates) if rates else 0.0,
        num_workers=settings.num_workers,
        train_rows=int(train_rows),
        elapsed_seconds=elapsed,
        run_path=str(result.path),
        failures=failures,
        storage_filesystem=storage_filesystem,
    )
