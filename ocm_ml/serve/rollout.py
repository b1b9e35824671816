"""Progressive rollout of a challenger on a live endpoint: canary steps with automatic rollback, or a shadow
window. Orchestrator-free: the caller hands in how to change the share, read the replicas' counters and send
probe traffic; the endpoint asset wires those to Ray Serve and HTTP.

Canary: the challenger answers ``steps[0]`` of the requests (say 5 %), then 25 %, 50 %, 100 %. A step ends
once it has lasted ``step_seconds`` and the challenger answered at least ``min_requests`` in it; its error
rate (errors / requests in the step) must stay at or under ``max_error_rate`` and its p99 latency (over the
replica's latest requests) under ``max_p99_ms``, else the rollout stops and the caller rolls back. A step
that gets too little traffic within ``step_timeout_seconds`` also rolls back: no evidence, no promotion.
Probe traffic (validation rows, sent one at a time) guarantees a step its requests when no user is calling.

Shadow: the challenger gets a copy of every batch for ``shadow_seconds`` and its answers are recorded but
never returned; it passes when it raised no errors and agreed with the champion on at least
``min_shadow_agreement`` of the items (0 = record only).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("replace", "canary", "shadow")


@dataclass(frozen=True)
class RolloutPolicy:
    strategy: str = "replace"
    steps: tuple[float, ...] = (0.05, 0.25, 0.5, 1.0)
    step_seconds: float = 10.0
    step_timeout_seconds: float = 120.0
    min_requests: int = 20
    max_error_rate: float = 0.01
    max_p99_ms: float = 250.0
    shadow_seconds: float = 10.0
    min_shadow_items: int = 20
    min_shadow_agreement: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"rollout strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not self.steps or any(not 0.0 < s <= 1.0 for s in self.steps):
            raise ValueError(f"canary steps must be shares in (0, 1], got {list(self.steps)}")
        if list(self.steps) != sorted(self.steps) or self.steps[-1] != 1.0:
            raise ValueError(f"canary steps must rise and end at 1.0 (all traffic), got {list(self.steps)}")
        if self.min_requests < 1 or self.min_shadow_items < 1:
            raise ValueError("min_requests and min_shadow_items must be at least 1")
        if not 0.0 <= self.max_error_rate < 1.0:
            raise ValueError(f"max_error_rate must be within [0, 1), got {self.max_error_rate}")
        if self.max_p99_ms <= 0 or self.step_seconds < 0 or self.shadow_seconds < 0:
            raise ValueError("max_p99_ms must be > 0; step_seconds and shadow_seconds must be >= 0")
        if self.step_timeout_seconds < self.step_seconds:
            raise ValueError("step_timeout_seconds must be at least step_seconds")
        if not 0.0 <= self.min_shadow_agreement <= 1.0:
            raise ValueError(f"min_shadow_agreement must be within 0-1, got {self.min_shadow_agreement}")


@dataclass
class RolloutOutcome:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)


class Probe:
    """Sends ``send()`` in a loop on a thread while a step runs (traffic for a canary nobody calls yet)."""

    def __init__(self, send: Callable[[], None] | None):
        self._send = send
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.failed = 0

    def __enter__(self) -> Probe:
        if self._send is not None:
            self._thread = threading.Thread(target=self._loop, name="ocm-rollout-probe", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        send = self._send
        assert send is not None  # __enter__ starts this thread only with a send function
        while not self._stop.is_set():
            try:
                send()
            except Exception:  # counted; the replica's own counters decide the step
                self.failed += 1
                self._stop.wait(0.05)
            self.sent += 1

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def run_canary(
    policy: RolloutPolicy,
    set_share: Callable[[float], None],
    read_stats: Callable[[], dict[str, Any]],
    send_probe: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RolloutOutcome:
    """Step the challenger's share up through ``policy.steps``; stop at the first step that breaks a
    threshold. ``read_stats()`` returns the replicas' counters (``canary_requests``, ``canary_errors``,
    ``canary_p99_ms``, ``champion_p99_ms``), summed over replicas, cumulative since the challenger loaded.
    The caller rolls back when the outcome did not pass, and completes the switch when it did."""
    outcome = RolloutOutcome(passed=True)
    with Probe(send_probe):
        for share in policy.steps:
            set_share(share)
            start, now, elapsed = _observe(read_stats, "canary_requests", policy.step_seconds,
                                           policy.min_requests, policy.step_timeout_seconds, clock, sleep)
            requests = now["canary_requests"] - start["canary_requests"]
            errors = now["canary_errors"] - start["canary_errors"]
            record = {"share": share, "seconds": round(elapsed, 1), "canary_requests": requests,
                      "canary_errors": errors, "canary_p99_ms": now.get("canary_p99_ms"),
                      "champion_p99_ms": now.get("champion_p99_ms")}
            outcome.steps.append(record)
            log(f"canary {share:.0%}: {requests} requests, {errors} errors, p99 {record['canary_p99_ms']} ms "
                f"(champion {record['champion_p99_ms']} ms) in {elapsed:.0f}s")
            failure = _step_failure(policy, record)
            if failure:
                outcome.passed = False
                outcome.reasons.append(f"rolled back at {share:.0%}: {failure}")
                return outcome
    outcome.reasons.append(
        f"canary passed every step ({', '.join(f'{s:.0%}' for s in policy.steps)}): error rate <= "
        f"{policy.max_error_rate:.1%}, p99 <= {policy.max_p99_ms:.0f} ms")
    return outcome


def _observe(read_stats, counter: str, min_seconds: float, min_count: int, timeout: float, clock, sleep,
             poll: float = 0.25) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Poll the counters until ``min_seconds`` have passed and ``counter`` grew by ``min_count``, or until
    ``timeout``; returns the counters at the start and at the end, and the seconds waited."""
    start = read_stats()
    began = clock()
    while True:
        sleep(poll)
        now = read_stats()
        elapsed = clock() - began
        if elapsed >= min_seconds and now[counter] - start[counter] >= min_count:
            return start, now, elapsed
        if elapsed >= timeout:
            return start, now, elapsed


def _step_failure(policy: RolloutPolicy, record: dict[str, Any]) -> str | None:
    requests, errors, p99 = record["canary_requests"], record["canary_errors"], record["canary_p99_ms"]
    if requests < policy.min_requests:
        return (f"only {requests} challenger requests in {record['seconds']}s (needs {policy.min_requests}): "
                "not enough traffic to judge it")
    rate = errors / requests
    if rate > policy.max_error_rate:
        return f"challenger error rate {rate:.1%} ({errors}/{requests}) > {policy.max_error_rate:.1%}"
    if p99 is not None and p99 > policy.max_p99_ms:
        return f"challenger p99 latency {p99:.1f} ms > {policy.max_p99_ms:g} ms"
    return None


def run_shadow(
    policy: RolloutPolicy,
    read_stats: Callable[[], dict[str, Any]],
    send_probe: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RolloutOutcome:
    """Mirror traffic to the challenger for ``policy.shadow_seconds`` (and until it has seen
    ``min_shadow_items``, within ``step_timeout_seconds``); judge its errors and agreement."""
    outcome = RolloutOutcome(passed=True)
    with Probe(send_probe):
        # The counters start at zero: loading the challenger resets them.
        _, stats, elapsed = _observe(read_stats, "shadow_items", policy.shadow_seconds,
                                     policy.min_shadow_items, policy.step_timeout_seconds, clock, sleep)
    items, errors = stats["shadow_items"], stats["shadow_errors"]
    agreement = stats["shadow_agreements"] / items if items else None
    record = {"mode": "shadow", "seconds": round(elapsed, 1), "shadow_items": items, "shadow_errors": errors,
              "shadow_skipped": stats.get("shadow_skipped", 0), "shadow_agreement": agreement}
    outcome.steps.append(record)
    log(f"shadow: {items} mirrored items, {errors} errors, agreement "
        f"{'-' if agreement is None else f'{agreement:.1%}'} in {elapsed:.0f}s")
    if items < policy.min_shadow_items:
        outcome.passed = False
        outcome.reasons.append(f"shadow saw only {items} items (needs {policy.min_shadow_items}): "
                               "not enough to judge")
    elif errors:
        outcome.passed = False
        outcome.reasons.append(f"challenger raised {errors} errors in shadow "
                               f"({stats.get('shadow_last_error')})")
    elif agreement is not None and agreement < policy.min_shadow_agreement:
        outcome.passed = False
        outcome.reasons.append(f"shadow agreement {agreement:.1%} < {policy.min_shadow_agreement:.1%}")
    else:
        outcome.reasons.append(f"shadow passed: {items} items, no errors, agreement {agreement:.1%}")
    return outcome


COUNTERS = ("canary_requests", "canary_errors", "champion_requests", "champion_errors", "shadow_items",
            "shadow_agreements", "shadow_skipped", "shadow_errors")


def sum_replica_stats(per_replica: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters summed over replicas; latencies as the worst replica's (a p99 cannot be summed)."""
    total: dict[str, Any] = {key: 0 for key in COUNTERS}
    for stats in per_replica:
        for key in COUNTERS:
            total[key] += int(stats.get(key) or 0)
        for key in ("canary_p99_ms", "champion_p99_ms"):
            if stats.get(key) is not None:
                total[key] = max(total.get(key) or 0.0, float(stats[key]))
            else:
                total.setdefault(key, None)
        if stats.get("shadow_last_error"):
            total["shadow_last_error"] = stats["shadow_last_error"]
    return total


# --- known answers and probe traffic: validation rows as /predict bodies -----------------------------------


def request_body(kind: str, parquet_file: Any, rows: int) -> dict[str, Any]:
    """The first ``rows`` rows of a validation split (an open parquet file) as a ``/predict`` body."""
    import pyarrow.parquet as pq

    if rows < 1:
        raise ValueError(f"a probe or known-answer check needs at least 1 row, got {rows}")
    table = pq.ParquetFile(parquet_file).read_row_group(0).slice(0, rows)
    if kind == "image":
        return {"images": [list(map(int, row)) for row in table.column("image").to_pylist()]}
    return {"texts": table.column("text").to_pylist()}


def offline_answers(kind: str, bundle: Any, body: dict[str, Any]) -> list[Any]:
    """What the registered model (a loaded ``ModelBundle``) answers for ``body``: class ids or labels."""
    if kind == "image":
        import numpy as np

        return [int(c) for c in bundle.predict(np.asarray(body["images"], dtype=np.float32))[0]]
    return list(bundle.predict(body["texts"])[0])


def served_answers(kind: str, response: dict[str, Any]) -> list[Any]:
    """The class ids or labels of a ``/predict`` response."""
    key = "class_id" if kind == "image" else "label"
    return [p[key] for p in response["predictions"]]
