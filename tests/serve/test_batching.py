"""The adaptive batcher: no wait at low load, batches grow while the model is busy, errors reach every caller.

Every test runs on a virtual clock (tests/virtual_clock.py): sleeps take no real time and ``loop.time()`` is
exact, so the assertions are about order, counts, which batch a request joined and when (in virtual
seconds) a batch ran, never about how fast this machine is."""

from __future__ import annotations

import asyncio

import pytest

from ocm_ml.serve.batching import AdaptiveBatcher
from tests.virtual_clock import run_virtual


def run(coro):
    return run_virtual(coro)


def test_single_request_runs_alone_and_at_once():
    calls = []

    async def fn(items):
        calls.append(list(items))
        return [x * 2 for x in items]

    async def main():
        batcher = AdaptiveBatcher(fn, max_batch_size=8)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await batcher.submit(21) == 42
        return loop.time() - t0

    assert run(main()) == 0.0  # no timer waited on: it ran at once
    assert calls == [[21]]


def test_batches_form_while_the_model_is_busy():
    calls = []

    async def fn(items):
        calls.append(list(items))
        await asyncio.sleep(0.05)  # the "forward pass"
        return [x + 1 for x in items]

    async def main():
        batcher = AdaptiveBatcher(fn, max_batch_size=4)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the model is now busy with [0]
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
        return await asyncio.gather(first, *rest), batcher.stats()

    results, stats = run(main())
    assert results == list(range(1, 8))
    assert calls == [[0], [1, 2, 3, 4], [5, 6]]  # capped at max_batch_size, in arrival order
    assert stats["batches"] == 3 and stats["items"] == 7


@pytest.mark.parametrize(("arrivals", "ran_at", "batches"), [
    (3, 0.02, [[0, 1, 2]]),  # full when the third arrives (0.01 s apart): runs then, before the deadline
    (2, 0.2, [[0, 1]]),  # never full: runs at the deadline, 0.2 s after the first arrived
])
def test_wait_timeout_fills_a_batch(arrivals, ran_at, batches):
    calls = []

    async def fn(items):
        calls.append((asyncio.get_running_loop().time(), list(items)))
        return items

    async def main():
        batcher = AdaptiveBatcher(fn, max_batch_size=3, batch_wait_timeout_s=0.2)
        futures = []
        for i in range(arrivals):
            futures.append(asyncio.ensure_future(batcher.submit(i)))
            await asyncio.sleep(0.01)
        return await asyncio.gather(*futures)

    assert run(main()) == list(range(arrivals))
    assert [items for _, items in calls] == batches
    assert calls[0][0] == pytest.approx(ran_at, abs=1e-9)


def test_errors_reach_every_caller_and_the_batcher_recovers():
    async def fn(items):
        if "boom" in items:
            raise RuntimeError("model failed")
        return items

    async def main():
        batcher = AdaptiveBatcher(fn, max_batch_size=4, batch_wait_timeout_s=0.05)
        bad = await asyncio.gather(batcher.submit("a"), batcher.submit("boom"), return_exceptions=True)
        good = await batcher.submit("b")
        return bad, good

    bad, good = run(main())
    assert all(isinstance(e, RuntimeError) for e in bad)
    assert good == "b"


def test_cancelled_requests_are_dropped():
    calls = []

    async def fn(items):
        calls.append(list(items))
        await asyncio.sleep(0.02)
        return items

    async def main():
        batcher = AdaptiveBatcher(fn, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.005)
        gone = asyncio.ensure_future(batcher.submit(2))
        kept = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0)
        gone.cancel()
        return await first, await kept

    assert run(main()) == (1, 3)
    assert calls == [[1], [3]]


def test_settings_can_change_live():
    batcher = AdaptiveBatcher(lambda items: items, max_batch_size=2)
    batcher.set_max_batch_size(16)
    batcher.set_batch_wait_timeout_s(0.01)
    assert (batcher.max_batch_size, batcher.batch_wait_timeout_s) == (16, 0.01)
    with pytest.raises(TypeError):
        batcher.set_max_batch_size(None)


def test_a_full_queue_refuses_at_once_and_recovers():
    from ocm_ml.serve.batching import QueueFull

    release = None
    calls = []

    async def fn(items):
        calls.append(list(items))
        await release.wait()
        return items

    async def main():
        nonlocal release
        release = asyncio.Event()
        batcher = AdaptiveBatcher(fn, max_batch_size=1, max_queued_items=5)
        running = asyncio.ensure_future(batcher.submit("a", size=100))  # taken at once: the queue is empty
        await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(batcher.submit(x, size=2)) for x in ("b", "c")]
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(QueueFull, match="4 items already wait") as info:
            await batcher.submit("d", size=2)  # 4 + 2 > 5
        refused_in = loop.time() - t0
        stats = batcher.stats()
        release.set()
        done = await asyncio.gather(running, *queued)
        after = await batcher.submit("f", size=5)  # room again once the queue drained
        return info.value, refused_in, stats, done, after

    exc, refused_in, stats, done, after = run(main())
    assert refused_in == 0.0 and exc.retry_after_s >= 1  # refused without waiting for anything
    assert stats["queued_items"] == 4 and stats["rejected"] == 1 and stats["max_queued_items"] == 5
    assert done == ["a", "b", "c"] and after == "f"
    assert ["d"] not in calls


def test_one_request_larger_than_the_bound_still_runs_alone():
    async def fn(items):
        return items

    async def main():
        batcher = AdaptiveBatcher(fn, max_queued_items=2)
        return await batcher.submit("big", size=1000)

    assert run(main()) == "big"
