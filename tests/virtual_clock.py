"""An asyncio event loop on a virtual clock, for tests of code that reads ``loop.time()`` and sleeps.

The clock moves only when every task waits for a timer: it then jumps straight to the next timer. So
``await asyncio.sleep(0.05)`` takes no real time, ``loop.time()`` reads exact virtual seconds, and what a
test sees depends only on the order of events, never on how busy the machine is.

    run_virtual(main())  # like asyncio.run(main()), on a VirtualClockLoop
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _InstantSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Answers ready I/O at once; when there is none and the loop would sleep until its next timer,
    advances the loop's clock by that timeout instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualClockLoop | None = None

    def select(self, timeout: float | None = None):
        ready = super().select(0)
        if ready or timeout is None or timeout <= 0 or self.loop is None:
            return ready if ready or timeout is not None else super().select(None)
        self.loop.advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual_now = 0.0
        selector = _InstantSelector()
        super().__init__(selector=selector)
        selector.loop = self

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:  # as asyncio.run: cancel what is left (e.g. an idle batcher worker), then close
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
