"""Build a large journal fast, through the journal's own code, and cache it.

W4 needs a journal of 1,000,000 events of finished runs plus 10,000 unfinished
runs. Running that many runs through `coda run` would take minutes, so the
histories are made here by `coda.decide` (the supervisor's own pure decisions,
so every history is one the supervisor could have written) and appended with
`SQLiteJournal.append` at `synchronous=OFF` in large batches: the journal's own
codec, schema and projections, only without waiting for the disk.

Finished runs are W2's `one_task` run: RunSubmitted, AttemptStarted,
TaskScheduled, TaskStarted, TaskCompleted, RunCompleted (6 events). Unfinished
runs stop after TaskStarted, as if the supervisor had died with their tasks
running (4 events). One template history per kind is decided once and copied
with a new run id per run.

The built file is cached under `$CODA_BENCH_CACHE` (default
`<tmp>/coda-bench-cache`), named by its counts and the journal's schema and
event format versions; each measurement works on a fresh copy of it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path

import attrs

from benchmarks.apps import coda_app
from coda import decide
from coda.journal.codec import FORMAT_VERSION
from coda.journal.events import Event
from coda.journal.sqlite import SQLiteJournal
from coda.replay.engine import CompleteRun, ScheduleTask

__all__ = ["cache_dir", "cached_journal", "one_task_history"]

RUNS_PER_APPEND = 500


def cache_dir() -> Path:
    default = Path(tempfile.gettempdir()) / "coda-bench-cache"
    path = Path(os.environ.get("CODA_BENCH_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def one_task_history(run_id: str, now: float, *, finished: bool) -> list[Event]:
    """The events the supervisor records for one `one_task` run."""
    workflow, task = coda_app.one_task, coda_app.noop
    state, events = decide.new_run(run_id, workflow.name, {}, workflow.policy, now)
    schedule = ScheduleTask(1, 0, task.name, {}, None, task.policy, task.timeout)
    events += decide.on_commands(state, [schedule], now)
    events += decide.start_task(state, state.steps[(1, 0)], "w1", now)
    if finished:
        events += decide.on_task_result(state, 1, 0, 1, None, now)
        events += decide.on_commands(state, [CompleteRun(1, None)], now)
    return events


async def _build(path: Path, finished_events: int, unfinished: int) -> None:
    now = time.time()
    done_template = one_task_history("template", now, finished=True)
    open_template = one_task_history("template", now, finished=False)
    finished_runs = -(-finished_events // len(done_template))
    kinds = [("done", i, done_template) for i in range(finished_runs)]
    kinds += [("open", i, open_template) for i in range(unfinished)]
    journal = await SQLiteJournal.open(path, synchronous="OFF")
    try:
        for start in range(0, len(kinds), RUNS_PER_APPEND * 8):
            calls = []
            for offset in range(
                start, min(start + RUNS_PER_APPEND * 8, len(kinds)), RUNS_PER_APPEND
            ):
                batch: list[Event] = []
                for kind, index, template in kinds[offset : offset + RUNS_PER_APPEND]:
                    run_id = f"{kind}-{index:07d}"
                    batch += [attrs.evolve(e, run_id=run_id) for e in template]
                calls.append(journal.append(batch))
            await asyncio.gather(*calls)
    finally:
        await journal.close()


def schema_version() -> int:
    """The journal schema version of this Coda (`PRAGMA user_version`)."""

    async def create(path: Path) -> None:
        journal = await SQLiteJournal.open(path, synchronous="OFF")
        await journal.close()

    with tempfile.TemporaryDirectory(prefix="coda-bench-schema-") as tmp:
        path = Path(tmp) / "empty.db"
        asyncio.run(create(path))
        with closing(sqlite3.connect(path)) as db:
            version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


def cached_journal(finished_events: int, unfinished: int) -> Path:
    """The path of the cached journal with these counts, built if missing."""
    name = (
        f"recovery-{finished_events}-{unfinished}"
        f"-schema{schema_version()}-v{FORMAT_VERSION}.db"
    )
    path = cache_dir() / name
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        asyncio.run(_build(partial, finished_events, unfinished))
        partial.rename(path)
    return path


def fresh_copy(source: Path, into: Path) -> Path:
    target = into / "coda.db"
    shutil.copyfile(source, target)
    return target
