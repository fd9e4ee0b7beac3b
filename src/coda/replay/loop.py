"""A deterministic asyncio event loop for workflow code.

Workflow code is ordinary `async def` code that may use `asyncio.gather`,
`asyncio.wait`, tasks and futures. Driving it on a real event loop would let I/O
readiness and wall-clock timers decide the order in which coroutines resume, and
that order decides the order in which tasks are spawned. This loop has neither:
it keeps one FIFO queue of ready callbacks and runs it until it is empty. Given
the same resolutions in the same order, the same code therefore resumes in the
same order every time, live or in replay.

Timers are refused: `asyncio.sleep(n)` with n > 0 would make a run depend on the
wall clock. `asyncio.sleep(0)` (a plain yield) works.

The loop is entered with `run_until_quiet()`, which makes it the running loop of
this thread for the duration (so `asyncio.get_running_loop()` and `gather` find
it) and puts back whatever loop was running before: a worker drives workflow
code from inside its own real event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
from asyncio import events as _events
from collections.abc import Callable, Coroutine
from typing import Any

from coda.errors import CodaError

__all__ = ["DeterministicLoop", "TimersNotAllowed"]


class TimersNotAllowed(CodaError, RuntimeError):
    """Workflow code asked for a wall-clock timer."""


class DeterministicLoop(asyncio.AbstractEventLoop):
    def __init__(self) -> None:
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._running = False
        self._closed = False
        self.errors: list[dict[str, Any]] = []

    # What asyncio's futures and tasks need from a loop.

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Any, *args: Any, **kw: Any
    ) -> Any:
        raise TimersNotAllowed(
            "workflow code cannot wait on the wall clock (asyncio.sleep, timeouts): "
            "that would make replay depend on timing. Do the waiting in a task."
        )

    def call_at(  # type: ignore[override]
        self, when: float, callback: Any, *args: Any, **kw: Any
    ) -> Any:
        return self.call_later(0.0, callback, *args)

    def time(self) -> float:
        return 0.0

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(  # type: ignore[override]
        self,
        coro: Coroutine[Any, Any, Any],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=self, name=name, context=context)

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._ready.clear()
        self._closed = True

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        # Asyncio reports here, for example, a task that was never awaited and
        # died with an exception. Keep it for the engine; never print from here.
        self.errors.append(context)

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    # Driving.

    def run_until_quiet(self) -> None:
        """Run ready callbacks, and those they schedule, until none is left."""
        previous = _events._get_running_loop()
        _events._set_running_loop(self)
        self._running = True
        try:
            ready = self._ready
            while ready:
                handle = ready.popleft()
                if not handle.cancelled():
                    handle._run()
        finally:
            self._running = False
            _events._set_running_loop(previous)
