"""An asyncio batcher that forms the next batch only when the model is free ("natural" batching).

Ray's ``@serve.batch`` forms batches on a timer, independently of the model: while one batch computes, the
next ones are cut from whatever arrived during ``batch_wait_timeout_s`` and queue for the model, so under
load the batches stay small. Here the single worker takes everything that queued up while the previous
batch computed (up to ``max_batch_size``): at low load a request runs at once, alone; at high load the
batches grow with the queue. A request that finds the model free and nobody waiting runs its batch of one
in its own task, with no hand-over to the worker (the concurrency-1 path costs a function call, ~0.2 us,
instead of a task switch, ~30 us); the worker takes whatever queued up behind it. The forward pass runs off
the event loop, so HTTP parsing and validation of the next requests overlap with it.

The queue is bounded in items (``max_queued_items``, e.g. images, as ``submit(item, size=n)`` counts
them): a request that would overflow it raises :class:`QueueFull` at once (the app answers 503 with
Retry-After) instead of waiting behind work the model cannot finish soon. A request always fits an empty
queue, whatever its size.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """The batcher's queue has no room for a request: retry after ``retry_after_s``."""

    retry_after_s = 1

    def __init__(self, queued: int, size: int, limit: int):
        self.message = (
            f"the replica is overloaded: {queued} items already wait for the model and this request brings "
            f"{size} more (at most {limit} may wait); retry after {self.retry_after_s}s or send smaller "
            "batches"
        )
        super().__init__(self.message)


class AdaptiveBatcher(Generic[T, R]):
    """``await batcher.submit(item)`` → the result of ``fn([... item ...])`` for that item.

    ``fn`` takes a list of items and returns a list of results of the same length. When
    ``batch_wait_timeout_s`` > 0 the worker waits that long for a batch to fill, but only when it found
    fewer than ``max_batch_size`` items ready; 0 never delays a request. ``max_queued_items`` (None: no
    bound) bounds the sizes of the queued requests; see :class:`QueueFull`.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[list[R]]],
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.0,
        max_queued_items: int | None = None,
    ):
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_queued_items = max_queued_items
        self._queue: deque[tuple[T, asyncio.Future[R], int]] = deque()
        self._queued_items = 0
        self._ready: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._busy = False  # a batch is computing (the worker's, or a lone request's own)
        self.batches = 0
        self.items = 0
        self.rejected = 0

    def set_max_batch_size(self, value: int) -> None:
        self.max_batch_size = int(value)

    def set_batch_wait_timeout_s(self, value: float) -> None:
        self.batch_wait_timeout_s = float(value)

    def set_max_queued_items(self, value: int | None) -> None:
        self.max_queued_items = None if value is None else int(value)

    def stats(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch_size": round(self.items / self.batches, 2) if self.batches else None,
            "queued": len(self._queue),
            "queued_items": self._queued_items,
            "max_queued_items": self.max_queued_items,
            "rejected": self.rejected,
        }

    async def submit(self, item: T, size: int = 1) -> R:
        """The result for ``item`` (``size`` items of work, for the queue bound); :class:`QueueFull` if the
        queue has no room for it."""
        limit = self.max_queued_items
        if limit is not None and self._queued_items and self._queued_items + size > limit:
            self.rejected += 1
            raise QueueFull(self._queued_items, size, limit)
        if self._ready is None:
            self._ready = asyncio.Event()
        if not self._busy and not self._queue and self.batch_wait_timeout_s <= 0:
            return await self._run_alone(item)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, size))
        self._queued_items += size
        self._ready.set()
        return await future

    async def _run_alone(self, item: T) -> R:
        """The model is free and nothing waits: run ``[item]`` now, in the caller's task. Requests arriving
        meanwhile queue for the worker, which starts once this batch is done."""
        self._busy = True
        self.batches += 1
        self.items += 1
        try:
            results = await self._fn([item])
            if len(results) != 1:
                raise RuntimeError(f"batch function returned {len(results)} results for 1 item")
            return results[0]
        finally:
            self._busy = False
            if self._queue:
                if self._worker is None or self._worker.done():
                    self._worker = asyncio.get_running_loop().create_task(self._run())
                assert self._ready is not None
                self._ready.set()

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future, size = self._queue.popleft()
            self._queued_items -= size
            if not future.done():  # a cancelled request (client went away) is dropped
                batch.append((item, future))
        return batch

    async def _run(self) -> None:
        assert self._ready is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or self._busy:  # nothing to do, or a lone request's batch still computes
                self._ready.clear()
                await self._ready.wait()
                continue
            wait = self.batch_wait_timeout_s
            if wait > 0 and len(self._queue) < self.max_batch_size:
                deadline = loop.time() + wait
                while len(self._queue) < self.max_batch_size and (left := deadline - loop.time()) > 0:
                    self._ready.clear()
                    try:
                        await asyncio.wait_for(self._ready.wait(), left)
                    except TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            self._busy = True
            try:
                results = await self._fn([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for "
                                       f"{len(batch)} items")
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
                if not isinstance(exc, Exception):
                    raise
                continue
            finally:
                self._busy = False
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
