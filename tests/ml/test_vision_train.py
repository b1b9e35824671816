"""Ray Train DDP training of the Fashion-MNIST ResNet18, on a real local Ray with 2 CPUs and tiny synthetic
data.

The images are learnable by construction (``ocm_ml.vision.synthetic``: class k lights up one 7x7 block over
noise), so an epoch on a few hundred images is far above chance.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from ocm_ml.vision import train as train_module
from ocm_ml.vision.lightning_module import LIGHTNING_CHECKPOINT_NAME
from ocm_ml.vision.model import build_resnet18, normalize_pixels
from ocm_ml.vision.predictor import ImagePredictor
from ocm_ml.vision.synthetic import images_table, synthetic_images, write_synthetic_parquet
from ocm_ml.vision.train import (
    EPOCH_KEYS,
    ImageBatchCollate,
    TrainSettings,
    aggregate_worker_metrics,
    pixels_from_arrow,
    train_fashion_mnist,
    validate_settings,
)

MEAN, STD = 0.2, 0.3
CLASS_NAMES = [f"class-{i}" for i in range(10)]
TWO_CPUS = {"CPU": 2.0, "memory": 1e9}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    train = write_synthetic_parquet(folder / "train.parquet", 320, seed=0)
    val = write_synthetic_parquet(folder / "val.parquet", 160, seed=1)
    val_images, val_labels = synthetic_images(160, seed=1)
    return {"train": train, "val": val, "val_images": val_images, "val_labels": val_labels}


def train_worker_pids() -> list[int]:
    """PIDs of this test's Ray Train worker processes (descendants of this process; the machine is shared)."""
    import psutil

    pids = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


# ------------------------------------------------------------------------------------------------------------
# Settings: fail fast, with a message that says what to change
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "cluster", "expected"),
    [
        (TrainSettings(num_workers=0), TWO_CPUS, "num_workers=0"),
        (TrainSettings(num_workers=-1), TWO_CPUS, "num_workers=-1"),
        (TrainSettings(batch_size=0), TWO_CPUS, "batch_size=0"),
        (TrainSettings(epochs=0), TWO_CPUS, "epochs=0"),
        (TrainSettings(learning_rate=0.0), TWO_CPUS, "learning_rate"),
        (TrainSettings(row_limit=0), TWO_CPUS, "row_limit=0"),
        (
            TrainSettings(num_workers=3),
            TWO_CPUS,
            "asks for 3 CPUs (3 workers x 1 CPU each) but the Ray cluster has 2",
        ),
        (TrainSettings(num_workers=2, cpus_per_worker=2), TWO_CPUS, "Lower num_workers to 1"),
        (TrainSettings(num_workers=1, gpus_per_worker=1), TWO_CPUS, "asks for 1 GPUs"),
        (TrainSettings(gradient_compression="int8"), TWO_CPUS, "gradient_compression='int8': must be one of"),
        (TrainSettings(prefetch_batches=-1), TWO_CPUS, "prefetch_batches=-1"),
    ],
)
def test_validate_settings_rejects(settings, cluster, expected):
    with pytest.raises(ValueError) as info:
        validate_settings(settings, cluster)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("settings", "cluster"),
    [
        (TrainSettings(num_workers=2, cpus_per_worker=1), TWO_CPUS),
        (TrainSettings(num_workers=1, cpus_per_worker=2), TWO_CPUS),
        (TrainSettings(num_workers=2, gpus_per_worker=1), {"CPU": 8.0, "GPU": 2.0}),
    ],
)
def test_validate_settings_accepts(settings, cluster):
    validate_settings(settings, cluster)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [(TrainSettings(num_workers=0), "num_workers=0"), (TrainSettings(num_workers=5), "asks for 5 CPUs")],
)
def test_training_with_bad_settings_fails_before_scheduling(ray_local, data, tmp_path, settings, expected,
                                                           monkeypatch):
    """Checks the order: the settings are refused before any data is read or any TorchTrainer is built."""
    import ray.train.torch

    happened = []
    read_images, trainer = train_module._read_images, ray.train.torch.TorchTrainer

    def reading(*args, **kwargs):
        happened.append("read")
        return read_images(*args, **kwargs)

    def building(*args, **kwargs):
        happened.append("trainer")
        return trainer(*args, **kwargs)

    monkeypatch.setattr(train_module, "_read_images", reading)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", building)
    with pytest.raises(ValueError) as info:
        train_fashion_mnist(data["train"], data["val"], MEAN, STD, settings, str(tmp_path), "bad")
    assert expected in str(info.value)
    assert happened == []
    assert not (tmp_path / "bad").exists()


def test_workers_rebuild_the_same_settings_and_the_module_shares_the_schedule_default():
    from dataclasses import fields

    from ocm_ml.vision.lightning_module import ImageClassifier

    settings = TrainSettings(num_workers=1, batch_size=16, lr_schedule="constant", row_limit=40, seed=3)
    sent = train_module.worker_config(settings, MEAN, STD, total_steps=None)
    assert TrainSettings(**sent["settings"]) == settings
    assert set(sent["settings"]) == {f.name for f in fields(TrainSettings)}
    assert ImageClassifier().hparams.lr_schedule == TrainSettings().lr_schedule == "onecycle"
    assert tuple(train_module._COMM_HOOKS) == train_module.GRADIENT_COMPRESSION


# ------------------------------------------------------------------------------------------------------------
# Gradient compression: the hook really runs on CPU (gloo), where Lightning itself registers none
# ------------------------------------------------------------------------------------------------------------


def _is_bf16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, t.to(torch.bfloat16).to(torch.float32)))


@pytest.mark.parametrize("compression", ["bf16", "fp16", "none"])
def test_ddp_strategy_all_reduces_gradients_in_the_chosen_format_on_cpu(compression):
    """One-process gloo group: after backward, DDP has replaced every gradient with its all-reduced value,
    which with bf16/fp16 compression was rounded to 16 bits."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ocm_ml.vision.train import _ddp_strategy

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        strategy = _ddp_strategy(compression, {"gradient_as_bucket_view": True})
        strategy.model = DistributedDataParallel(model)
        strategy._register_ddp_hooks()  # what Lightning calls after wrapping the module
        loss = strategy.model(torch.randn(32, 64)).square().mean()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        if compression == "bf16":
            assert all(_is_bf16_exact(g) for g in grads)
        elif compression == "fp16":
            assert all(torch.equal(g, g.to(torch.float16).to(torch.float32)) for g in grads)
        else:  # float32 all-reduce: gradients keep their full precision
            assert not all(_is_bf16_exact(g) for g in grads)
    finally:
        dist.destroy_process_group()


def test_comm_hook_names_the_choices():
    from ocm_ml.vision.train import comm_hook

    assert comm_hook("none") is None
    with pytest.raises(ValueError, match="gradient_compression must be one of"):
        comm_hook("zstd")


# ------------------------------------------------------------------------------------------------------------
# Pure pieces: collate and predictor
# ------------------------------------------------------------------------------------------------------------


def test_collate_matches_normalize_pixels_on_sliced_arrow_data():
    images, labels = synthetic_images(12, seed=3)
    table = images_table(images, labels)
    sliced = table.slice(5, 4)  # a batch that starts inside an arrow buffer
    np.testing.assert_array_equal(pixels_from_arrow(sliced.column("image")), images[5:9])
    x, y = ImageBatchCollate(MEAN, STD)(sliced)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x, normalize_pixels(torch.from_numpy(images[5:9]), MEAN, STD))
    assert y.tolist() == labels[5:9].tolist()


def test_pixels_from_arrow_rejects_wrong_row_length():
    column = pa.chunked_array([pa.array([[1, 2, 3]], type=pa.list_(pa.uint8()))])
    with pytest.raises(ValueError, match="784"):
        pixels_from_arrow(column)


def test_predictor_shapes_and_validation():
    torch.manual_seed(0)
    predictor = ImagePredictor(build_resnet18(10), MEAN, STD, CLASS_NAMES)
    images, _ = synthetic_images(5, seed=4)
    for batch in (images, images.reshape(5, 28, 28), torch.from_numpy(images)):
        class_ids, confidences = predictor.predict(batch)
        assert class_ids.shape == (5,) and class_ids.dtype == np.int64
        assert confidences.shape == (5,) and np.all((confidences > 0) & (confidences <= 1))
        assert np.all((class_ids >= 0) & (class_ids < 10))
    assert not predictor.model.training
    for bad in (np.zeros((2, 783)), np.zeros((0, 784)), np.zeros(784)):
        with pytest.raises(ValueError, match="shape"):
            predictor.predict(bad)


def test_aggregate_worker_metrics_averages_every_worker():
    base = {"epoch": 3, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 2.0, "val_accuracy": 0.25}
    record = aggregate_worker_metrics(
        [
            {**base, "images_per_second": 300.0, "train_images": 160.0, "step": 5},
            {**base, "val_accuracy": 0.75, "images_per_second": 100.0, "train_images": 160.0, "step": 5},
        ]
    )
    assert record["epoch"] == 3 and isinstance(record["epoch"], int)
    assert record["val_accuracy"] == 0.5 and record["images_per_second"] == 200.0
    assert set(record) == {*EPOCH_KEYS, "train_images"}


# ------------------------------------------------------------------------------------------------------------
# Real distributed training
# ------------------------------------------------------------------------------------------------------------


# The driver waits on the progress queue for up to an hour here: the run must still end as soon as fit()
# returns (the "fit returned" event wakes it), or pytest-timeout fails the test.
@pytest.mark.timeout(900)
def test_two_worker_ddp_training_reports_epochs_live_and_checkpoints(ray_local, data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "_EVENT_WAIT_S", 3600.0)
    calls: list[tuple[dict, int]] = []

    def on_epoch(record: dict) -> None:
        calls.append((record, len(train_worker_pids())))

    result = train_fashion_mnist(
        data["train"],
        data["val"],
        MEAN,
        STD,
        TrainSettings(num_workers=2, cpus_per_worker=1, batch_size=32, epochs=2, learning_rate=1e-3),
        storage_path=str(tmp_path),
        run_name="ddp",
        on_epoch=on_epoch,
    )

    # Progress arrived per epoch, while the training workers were still alive.
    assert [record["epoch"] for record, _ in calls] == [0, 1]
    assert calls[0][1] == 2, "first on_epoch came after the training workers were gone"
    assert set(calls[0][0]) == set(EPOCH_KEYS)

    assert [h["epoch"] for h in result.history] == [0, 1]
    for record in result.history:
        assert set(record) == set(EPOCH_KEYS)
        assert all(math.isfinite(record[k]) for k in EPOCH_KEYS)
        assert record["images_per_second"] > 0
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert result.val_accuracy > 0.5  # chance is 0.1
    assert result.val_accuracy == max(h["val_accuracy"] for h in result.history)
    assert result.num_workers == 2
    assert result.train_rows == 320
    assert result.failures == []
    assert result.images_per_second > 0 and result.elapsed_seconds > 0
    assert (Path(result.checkpoint_path) / LIGHTNING_CHECKPOINT_NAME).is_file()
    assert Path(result.checkpoint_path).parent == tmp_path / "ddp"

    # The predictor built from the best checkpoint reproduces the reported validation accuracy.
    predictor = ImagePredictor.from_checkpoint(result.checkpoint_path, MEAN, STD, CLASS_NAMES)
    class_ids, confidences = predictor.predict(data["val_images"])
    assert class_ids.shape == confidences.shape == (160,)
    accuracy = float((class_ids == data["val_labels"]).mean())
    assert abs(accuracy - result.val_accuracy) < 0.02
    network = result.load_model()
    assert isinstance(network, torch.nn.Module) and not network.training
    torch.testing.assert_close(
        network.state_dict()["fc.weight"], predictor.model.state_dict()["fc.weight"], rtol=0, atol=0
    )


@pytest.mark.slow
def test_killed_worker_is_replaced_and_training_resumes_from_checkpoint(ray_local, data, tmp_path):
    seen: list[int] = []
    killed: list[int] = []

    def on_epoch(record: dict) -> None:
        seen.append(record["epoch"])
        if not killed:
            pids = train_worker_pids()
            assert len(pids) == 2, pids
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    result = train_fashion_mnist(
        data["train"],
        data["val"],
        MEAN,
        STD,
        TrainSettings(num_workers=2, batch_size=32, epochs=3, max_failures=2),
        storage_path=str(tmp_path),
        run_name="fault",
        on_epoch=on_epoch,
    )

    assert killed
    # Resumed from epoch 0's checkpoint: epoch 0 is not trained (or reported) a second time.
    assert seen == [0, 1, 2]
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.failures, "the worker failure was not recorded"
    assert any("rank" in failure for failure in result.failures)
    assert killed[0] not in train_worker_pids()
    assert (Path(result.checkpoint_path) / LIGHTNING_CHECKPOINT_NAME).is_file()
    assert result.val_accuracy > 0.5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_that_keeps_failing_raises_runtime_error(ray_local, data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "_EVENT_WAIT_S", 3600.0)  # a failed fit() must end the wait too
    def on_epoch(record: dict) -> None:
        for pid in train_worker_pids():
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(RuntimeError) as info:
        train_fashion_mnist(
            data["train"],
            data["val"],
            MEAN,
            STD,
            TrainSettings(num_workers=2, batch_size=32, epochs=3, max_failures=0),
            storage_path=str(tmp_path),
            run_name="doomed",
            on_epoch=on_epoch,
        )
    message = str(info.value)
    assert "doomed" in message and "max_failures=0" in message
    assert "died" in message.lower() or "error" in message.lower()  # Ray's own text is included


@pytest.fixture
def s3_bucket():
    """A real S3 endpoint (moto's server on a free local port) with one bucket; yields a pyarrow
    S3FileSystem."""
    import socket

    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = fs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            endpoint_override=f"http://127.0.0.1:{port}",
            scheme="http",
            allow_bucket_creation=True,
        )
        s3.create_dir("ocm")
        yield s3
    finally:
        server.stop()


@pytest.mark.slow
def test_training_reads_and_checkpoints_on_s3(ray_local, data, s3_bucket):
    from pyarrow.fs import copy_files

    for split in ("train", "val"):
        copy_files(data[split], f"ocm/data/{split}.parquet", destination_filesystem=s3_bucket)

    result = train_fashion_mnist(
        "s3://ocm/data/train.parquet",
        "s3://ocm/data/val.parquet",
        MEAN,
        STD,
        TrainSettings(num_workers=2, batch_size=32, epochs=1),
        storage_path="ocm/results",
        run_name="on-s3",
        storage_filesystem=s3_bucket,
    )

    assert result.checkpoint_path.startswith("ocm/results/on-s3/")
    info = s3_bucket.get_file_info(f"{result.checkpoint_path}/checkpoint.ckpt")
    assert info.size > 10_000_000  # the ResNet18 weights and optimizer state
    predictor = ImagePredictor(result.load_model(), MEAN, STD, CLASS_NAMES)
    class_ids, _ = predictor.predict(data["val_images"])
    assert abs(float((class_ids == data["val_labels"]).mean()) - result.val_accuracy) < 0.02
