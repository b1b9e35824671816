"""The replica's prediction log: a sample of what an endpoint serves, as partitioned parquet.

The request path only appends a reference to the validated inputs and the answer to a buffer (one lock,
no I/O, no numpy); a background thread summarizes the buffered inputs (:mod:`ocm_ml.drift`) and writes
one parquet file per flush and hour::

    <root>/<family>/date=YYYY-MM-DD/hour=HH/<replica>-<n>.parquet

through a pyarrow filesystem, so ``root`` is a folder or ``s3://bucket/prefix`` (credentials from the
replica's environment, as for every S3 client; never in the user_config). One row per input: timestamp,
request id, family, replica, model URI/name/version, MLflow run, data version (registry tag) and its
commit, the prediction, its confidence and the input summary (images: pixel mean/std and a 16-bin
histogram; texts: length, token count, out-of-vocabulary share).

Settings (the user_config key ``prediction_log``, see :class:`LogSettings`)::

    {"root": "/abs/.ocm/prediction_log", "family": "fashion_mnist", "sample_rate": 1.0}

Readers: :func:`read_log` (one hour or a time range, any filesystem).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

logger = logging.getLogger("ray.serve")

LOG_SCHEMA_FIELDS = (
    ("ts", "timestamp"), ("request_id", "string"), ("family", "string"), ("replica", "string"),
    ("model_uri", "string"), ("model_name", "string"), ("model_version", "string"), ("run_id", "string"),
    ("data_version", "string"), ("dvc_commit", "string"), ("kind", "string"), ("item", "int32"),
    ("prediction", "string"), ("class_id", "int32"), ("confidence", "float32"),
)


@dataclass(frozen=True)
class LogSettings:
    """``root``: folder or ``s3://bucket/prefix``; ``family``: the folder under it (the app name);
    ``sample_rate``: share of requests recorded (1.0 = every request); ``flush_interval_s``: how often the
    background thread writes; ``max_buffered_rows``: rows held before a flush is forced (beyond 4x that,
    new rows are dropped and counted, so a failing store never grows the replica's memory);
    ``s3_endpoint``: an S3-compatible endpoint (``http://minio:9000``); ``s3_region``."""

    root: str
    family: str
    sample_rate: float = 1.0
    flush_interval_s: float = 5.0
    max_buffered_rows: int = 4096
    s3_endpoint: str | None = None
    s3_region: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root:
            raise ValueError("prediction_log.root must be a folder or s3://bucket/prefix")
        if "@" in self.root.split("/")[2 if "://" in self.root else 0]:
            raise ValueError("prediction_log.root must not carry credentials; "
                             "the replica's environment has them")
        if not isinstance(self.family, str) or not self.family or "/" in self.family:
            raise ValueError(f"prediction_log.family must be a folder name, got {self.family!r}")
        if isinstance(self.sample_rate, bool) or not 0.0 <= float(self.sample_rate) <= 1.0:
            raise ValueError(f"prediction_log.sample_rate must be within 0-1, got {self.sample_rate!r}")
        if not float(self.flush_interval_s) > 0:
            raise ValueError(f"prediction_log.flush_interval_s must be > 0, got {self.flush_interval_s!r}")
        if int(self.max_buffered_rows) < 1:
            raise ValueError(f"prediction_log.max_buffered_rows must be >= 1, got {self.max_buffered_rows!r}")

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> LogSettings | None:
        """None (logging off) for None or ``{}``; unknown keys are refused so that typos surface."""
        if not config:
            return None
        if not isinstance(config, dict):
            raise ValueError(f"prediction_log must be a mapping, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown prediction_log key(s) {unknown}; known keys: {sorted(known)}")
        missing = sorted({"root", "family"} - set(config))
        if missing:
            raise ValueError(f"prediction_log needs {missing}")
        return cls(**config)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def filesystem_for(root: str, s3_endpoint: str | None = None, s3_region: str | None = None):
    """(pyarrow filesystem, base path) for a folder or an ``s3://`` URI."""
    from pyarrow import fs

    if root.startswith("s3://"):
        scheme, endpoint = "https", s3_endpoint
        if endpoint and "://" in endpoint:
            scheme, _, endpoint = endpoint.partition("://")
        return (fs.S3FileSystem(endpoint_override=endpoint, scheme=scheme, region=s3_region),
                root.removeprefix("s3://").rstrip("/"))
    if "://" in root:
        filesystem, path = fs.FileSystem.from_uri(root)
        return filesystem, path.rstrip("/")
    from pathlib import Path

    return fs.LocalFileSystem(), str(Path(root).expanduser().resolve())


def partition_dir(base: str, family: str, when: datetime) -> str:
    when = when.astimezone(UTC)
    return f"{base}/{family}/date={when:%Y-%m-%d}/hour={when:%H}"


class PredictionRecorder:
    """Buffers sampled answers of one replica and writes them from a background thread.

    ``record`` is all the request path calls. ``configure`` (at every reconfigure) switches settings,
    flushing what the old ones buffered; ``close`` flushes and stops the thread (replica shutdown).
    """

    def __init__(self) -> None:
        self.settings: LogSettings | None = None
        self.replica = "replica"
        self._lock = threading.Lock()
        self._buffer: list[tuple] = []
        self._buffered_rows = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fs = None
        self._base = ""
        self._seq = 0
        self._rng = random.Random()
        self.stats = {"rows_written": 0, "files_written": 0, "rows_dropped": 0, "write_errors": 0,
                      "last_error": None, "last_file": None}

    # --- control --------------------------------------------------------------------------------------

    def configure(self, settings: LogSettings | None, replica: str | None = None) -> None:
        if replica:
            self.replica = "".join(c if c.isalnum() or c in "-_." else "_" for c in replica)
        if settings == self.settings:
            return
        self.flush()
        fs_, base = (None, "") if settings is None else filesystem_for(
            settings.root, settings.s3_endpoint, settings.s3_region)
        with self._lock:
            self.settings, self._fs, self._base = settings, fs_, base
        if settings is not None and (self._thread is None or not self._thread.is_alive()):
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ocm-prediction-log", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {"enabled": s is not None, "sample_rate": s.sample_rate if s else 0.0,
                "buffered_rows": self._buffered_rows, **self.stats}

    # --- the request path -----------------------------------------------------------------------------

    def sampled(self) -> bool:
        s = self.settings
        return s is not None and (s.sample_rate >= 1.0 or self._rng.random() < s.sample_rate)

    def record(self, request_id: str, bundle: Any, inputs: Any, predictions: Any, confidences: Any,
               class_ids: Any = None) -> None:
        """Queue one answered request (``inputs`` as validated: (N, 784) pixels or a list of texts)."""
        s = self.settings
        if s is None:
            return
        n = len(inputs)
        with self._lock:
            if self._buffered_rows + n > 4 * s.max_buffered_rows:
                self.stats["rows_dropped"] += n
                return
            self._buffer.append((time.time(), request_id, bundle, inputs, predictions, confidences,
                                 class_ids))
            self._buffered_rows += n
            full = self._buffered_rows >= s.max_buffered_rows
        if full:
            self._wake.set()

    # --- the background thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.settings
            self._wake.wait(timeout=s.flush_interval_s if s else 1.0)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # never let the thread die; count and log (rate-limited by interval)
                self.stats["write_errors"] += 1
                self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
                logger.warning("prediction log flush failed: %s", self.stats["last_error"])

    def flush(self) -> int:
        """Write everything buffered now (one file per hour it spans); returns the rows written."""
        with self._lock:
            items, self._buffer, self._buffered_rows = self._buffer, [], 0
            settings, filesystem, base = self.settings, self._fs, self._base
        if not items or settings is None:
            return 0
        table = self._table(items, settings)
        return self._write(table, settings, filesystem, base)

    def _table(self, items: list[tuple], settings: LogSettings):
        import numpy as np
        import pyarrow as pa

        from ocm_ml.drift import HIST_BINS, summarize_images, summarize_texts

        cols: dict[str, list] = {name: [] for name, _ in LOG_SCHEMA_FIELDS}
        images, texts = [], []
        kind = None
        for ts, request_id, bundle, inputs, predictions, confidences, class_ids in items:
            resolved = bundle.resolved
            n = len(inputs)
            kind = bundle.kind
            (images if kind == "image" else texts).append(inputs)
            stamp = datetime.fromtimestamp(ts, tz=UTC)
            cols["ts"] += [stamp] * n
            cols["request_id"] += [request_id] * n
            cols["family"] += [settings.family] * n
            cols["replica"] += [self.replica] * n
            cols["model_uri"] += [bundle.model_uri] * n
            cols["model_name"] += [resolved.model_name] * n
            cols["model_version"] += [resolved.model_version] * n
            cols["run_id"] += [resolved.run_id] * n
            cols["data_version"] += [bundle.data_version] * n
            cols["dvc_commit"] += [resolved.run_tags.get("dvc_commit")] * n
            cols["kind"] += [kind] * n
            cols["item"] += list(range(n))
            cols["prediction"] += [str(p) for p in predictions]
            cols["class_id"] += [int(c) for c in class_ids] if class_ids is not None else [None] * n
            cols["confidence"] += [float(c) for c in confidences]
        types = {"timestamp": pa.timestamp("us", tz="UTC"), "string": pa.string(), "int32": pa.int32(),
                 "float32": pa.float32()}
        arrays = {name: pa.array(cols[name], type=types[t]) for name, t in LOG_SCHEMA_FIELDS}
        rows = len(arrays["ts"])
        if images:
            summary = summarize_images(np.concatenate([np.asarray(x, dtype=np.float32) for x in images]))
            arrays["pixel_mean"] = pa.array(summary["pixel_mean"])
            arrays["pixel_std"] = pa.array(summary["pixel_std"])
            hist = np.stack([summary[f"hist_{i:02d}"] for i in range(HIST_BINS)], axis=1)
            arrays["hist"] = pa.FixedSizeListArray.from_arrays(pa.array(hist.ravel()), HIST_BINS)
        if texts:
            summary = summarize_texts([t for part in texts for t in part], self._vocabulary(items[-1][2]))
            for name in ("text_length", "token_count", "oov_share"):
                arrays[name] = pa.array(summary[name])
        assert all(len(a) == rows for a in arrays.values())
        return pa.table(arrays)

    def _vocabulary(self, bundle: Any) -> frozenset[str] | None:
        """The whole-word entries of the text model's tokenizer vocabulary (ocm's pyfunc), cached per bundle;
        None when the model has no reachable tokenizer (then ``oov_share`` is NaN)."""
        cached = getattr(self, "_vocab_cache", (None, None))
        if cached[0] is bundle:
            return cached[1]
        vocab = None
        try:
            model = bundle.model
            python_model = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else model
            predictor = getattr(python_model, "_predictor", None)
            tokenizer = getattr(predictor, "tokenizer", None)
            if tokenizer is not None:
                vocab = frozenset(w.casefold() for w in tokenizer.get_vocab() if w.isalnum())
        except Exception:  # a pyfunc of another shape: no vocabulary
            vocab = None
        self._vocab_cache = (bundle, vocab)
        return vocab

    def _write(self, table, settings: LogSettings, filesystem, base: str) -> int:
        import pyarrow.compute as _pc
        import pyarrow.parquet as pq

        pc: Any = _pc  # its import-time generated functions (unique, equal, ...) are not in pyarrow's stubs

        hours = pc.floor_temporal(table["ts"], unit="hour")
        written = 0
        for hour in pc.unique(hours).to_pylist():
            part = table.filter(pc.equal(hours, hour))
            folder = partition_dir(base, settings.family, hour)
            self._seq += 1
            name = f"{self.replica}-{int(time.time() * 1000)}-{self._seq:06d}.parquet"
            try:
                filesystem.create_dir(folder, recursive=True)
                if type(filesystem).__name__ == "LocalFileSystem":  # readers never see a half-written file
                    tmp = f"{folder}/.{name}.tmp"
                    pq.write_table(part, tmp, filesystem=filesystem)
                    filesystem.move(tmp, f"{folder}/{name}")
                else:  # an S3 object appears whole when the upload completes
                    pq.write_table(part, f"{folder}/{name}", filesystem=filesystem)
            except Exception as exc:
                self.stats["write_errors"] += 1
                self.stats["rows_dropped"] += part.num_rows
                self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
                logger.warning("prediction log: could not write %d rows to %s: %s", part.num_rows, folder,
                               self.stats["last_error"])
                continue
            written += part.num_rows
            self.stats["rows_written"] += part.num_rows
            self.stats["files_written"] += 1
            self.stats["last_file"] = f"{folder}/{name}"
        return written


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """Every whole hour (UTC) that [start, end) touches."""
    start = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    end = end.astimezone(UTC)
    out = []
    while start < end:
        out.append(start)
        start += timedelta(hours=1)
    return out


def read_log(root: str, family: str, start: datetime, end: datetime, *, filesystem=None):
    """The log rows of ``family`` with ``start <= ts < end`` (a pyarrow Table; empty with the log's
    columns when nothing was logged). ``filesystem``: a pyarrow filesystem for ``root`` (default: derived
    from it, S3 credentials from the environment)."""
    import pyarrow as pa
    import pyarrow.compute as _pc
    import pyarrow.parquet as pq

    pc: Any = _pc  # its import-time generated functions (and_, less, ...) are not in pyarrow's stubs

    if filesystem is None:
        filesystem, base = filesystem_for(root)
    else:
        base = root.removeprefix("s3://").rstrip("/")
    from pyarrow import fs as pafs

    tables = []
    for hour in hours_between(start, end):
        folder = partition_dir(base, family, hour)
        infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            name = info.path.rsplit("/", 1)[-1]
            if info.type == pafs.FileType.File and name.endswith(".parquet") and not name.startswith("."):
                tables.append(pq.read_table(info.path, filesystem=filesystem))
    if not tables:
        return pa.table({name: pa.array([], type=pa.string()) for name, _ in LOG_SCHEMA_FIELDS})
    table = pa.concat_tables(tables, promote_options="default")
    ts = table["ts"]
    lo = pa.scalar(start.astimezone(UTC), type=ts.type)
    hi = pa.scalar(end.astimezone(UTC), type=ts.type)
    return table.filter(pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi)))
