"""Tasks that misbehave, for `test_task_failures.py` (run with one worker).

`call` runs the named tasks one after another and reports, for each, its
result or the type of its `TaskError`; `pid` tells which worker process
answered, so a test can tell whether a worker survived a task.
"""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import os
import time
from typing import Any

import coda


@coda.task()
def pid() -> int:
    return os.getpid()


@coda.task(max_lost_workers=2)
def exits_its_worker() -> None:
    os._exit(3)


@coda.task(max_lost_workers=2)
def segfaults() -> None:
    faulthandler.disable()  # no traceback dump: the crash is the point
    ctypes.string_at(0)


@coda.task()
def raises_system_exit() -> None:
    raise SystemExit(2)


@coda.task()
async def raises_system_exit_async() -> None:
    raise SystemExit(2)


@coda.task()
def raises_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


@coda.task()
async def raises_keyboard_interrupt_async() -> None:
    raise KeyboardInterrupt


@coda.task()
def raises_cancelled() -> None:
    raise asyncio.CancelledError


@coda.task()
async def raises_cancelled_async() -> None:
    raise asyncio.CancelledError


@coda.task(max_lost_workers=1)
async def blocks_the_loop() -> None:
    time.sleep(30)  # an async task that never yields: no heartbeat answered


@coda.task(timeout=1.0)
def spins() -> None:
    while True:
        pass


@coda.task(max_lost_workers=2, backoff=0.05)
def crashes_after(seconds: float) -> None:
    time.sleep(seconds)
    os._exit(3)


@coda.task(max_lost_workers=2, backoff=0.05)
async def innocent(value: int, seconds: float) -> int:
    await asyncio.sleep(seconds)
    return value * 10


TASKS = {
    t.name: t
    for t in (
        pid,
        exits_its_worker,
        segfaults,
        raises_system_exit,
        raises_system_exit_async,
        raises_keyboard_interrupt,
        raises_keyboard_interrupt_async,
        raises_cancelled,
        raises_cancelled_async,
        blocks_the_loop,
        spins,
    )
}


@coda.workflow()
async def call(names: list[str]) -> list[dict[str, Any]]:
    """Each named task in turn, each followed by `pid`: who answered next."""
    out = []
    for name in names:
        try:
            result = await coda.context.spawn_task(TASKS[name])
            outcome = {"task": name, "result": result}
        except coda.TaskError as exc:
            outcome = {"task": name, "error": exc.remote_type}
        outcome["pid_after"] = await coda.context.spawn_task(pid)
        out.append(outcome)
    return out


@coda.workflow()
async def crowd(innocents: int) -> dict[str, Any]:
    """A crashing task started together with innocent ones, on one worker."""
    crasher = coda.context.spawn_task(crashes_after, args={"seconds": 0.3})
    others = [
        coda.context.spawn_task(innocent, args={"value": i, "seconds": 1.0})
        for i in range(innocents)
    ]
    results = [await other for other in others]
    try:
        await crasher
        crashed = None
    except coda.TaskError as exc:
        crashed = exc.remote_type
    return {"innocents": results, "crasher": crashed}
