"""The Coda app of the benchmark: `coda run benchmarks.apps.coda_app`.

    pipeline(project_id, event_data, store_path)   W1: normalize, symbolicate, store
    one_task()                                     W2, W3, W4, W6: one no-op task
    long_run(tasks, width)                         W5: `tasks` no-op tasks, `width`
                                                   at a time, then a gate task

The pipeline's tasks are plain `def`, like the example's, and so is the no-op
task: every peer runs the same plain functions. The gate task waits (bounded)
for a file to exist, so that W5 can stop the supervisor while the run is
unfinished and time its resumption.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import coda
from benchmarks.apps import probe, work

del probe  # imported for its SIGUSR1 hook in the supervisor (W6), if enabled


@coda.task()
def normalize_event(project_id: int, event_data: dict[str, Any]) -> dict[str, Any]:
    return work.normalize_step(project_id, event_data)


@coda.task()
def symbolicate_event(project_id: int, event_data: dict[str, Any]) -> dict[str, Any]:
    return work.symbolicate_step(project_id, event_data)


@coda.task()
def store_event(
    project_id: int, event_data: dict[str, Any], store_path: str
) -> dict[str, Any]:
    return work.store_step(project_id, event_data, store_path)


@coda.workflow()
async def pipeline(
    project_id: int, event_data: dict[str, Any], store_path: str
) -> dict[str, Any]:
    event_id = event_data["event_id"]
    event = await coda.context.spawn_task(
        normalize_event,
        args={"project_id": project_id, "event_data": event_data},
        cache_key=["normalize", event_id],
    )
    event = await coda.context.spawn_task(
        symbolicate_event,
        args={"project_id": project_id, "event_data": event},
        cache_key=["symbolicate", event_id],
    )
    return await coda.context.spawn_task(
        store_event,
        args={"project_id": project_id, "event_data": event, "store_path": store_path},
        cache_key=["store", event_id],
    )


@coda.task()
def noop() -> None:
    return None


@coda.workflow()
async def one_task() -> None:
    return await coda.context.spawn_task(noop, args={}, cache_key=None)


@coda.task()
def gate(path: str, limit_s: float = 120.0) -> bool:
    """Return once `path` exists (False after `limit_s`): W5 holds its run open."""
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@coda.workflow()
async def long_run(tasks: int, width: int, gate_path: str) -> int:
    done = 0
    while done < tasks:
        batch = min(width, tasks - done)
        await asyncio.gather(
            *(
                coda.context.spawn_task(noop, args={}, cache_key=None)
                for _ in range(batch)
            )
        )
        done += batch
    await coda.context.spawn_task(gate, args={"path": gate_path}, cache_key=None)
    return done
