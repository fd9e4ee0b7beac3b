"""The Huey app of the benchmark: the same functions as Coda's, on SqliteHuey.

The queue's file comes from `CODA_BENCH_HUEY_DB`. SqliteHuey keeps its
defaults (WAL; `synchronous` left at SQLite's default, FULL). A Huey pipeline
passes a task's return value on to the next task: a tuple is appended to its
positional arguments, so the first two steps return `(event,)`.
"""

from __future__ import annotations

import os
from typing import Any

from huey import SqliteHuey

from benchmarks.apps import work

huey = SqliteHuey(
    "coda-bench", filename=os.environ.get("CODA_BENCH_HUEY_DB", "huey-bench.db")
)


@huey.task()
def normalize_event(project_id: int, event_data: dict[str, Any]) -> tuple[Any, ...]:
    return (work.normalize_step(project_id, event_data),)


@huey.task()
def symbolicate_event(project_id: int, event_data: dict[str, Any]) -> tuple[Any, ...]:
    return (work.symbolicate_step(project_id, event_data),)


@huey.task()
def store_event(
    project_id: int, store_path: str, event_data: dict[str, Any]
) -> dict[str, Any]:
    return work.store_step(project_id, event_data, store_path)


@huey.task()
def noop() -> bool:
    # Huey stores no result for None (store_none=False), and the benchmark
    # waits on results; True is as cheap.
    return True
