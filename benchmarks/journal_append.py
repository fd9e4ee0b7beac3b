"""The journal alone: events/s through group commit, beside raw SQLite.

Coda: `SQLiteJournal.append` at `synchronous=FULL` (the default) from 500
concurrent callers. Each caller plays the supervisor's part for one-task runs
one after another, with the supervisor's calls: [RunSubmitted, AttemptStarted],
[TaskScheduled], [TaskStarted], [TaskCompleted], [RunCompleted] (the events are
`journal_builder.one_task_history`'s, decided by `coda.decide`), so the journal
also keeps its `runs` projection as it does under W2. Events are encoded inside
`append`, as in the supervisor, and the process's garbage collector is set
as in the supervisor (`coda.runtime.heap.settle_heap`). Group commit makes the
batches; `batch_mean` is the mean number of events per transaction.

Raw SQLite (the peer `sqlite`): the same event rows (already encoded: run key,
position, time, type, body) in the order the callers' calls interleave,
inserted with the `sqlite3` module into the `events` table of a fresh journal
file (the `runs` rows inserted beforehand, untimed), WAL and
`synchronous=FULL`, one `executemany` in one transaction per batch, batches as
large as Coda's mean batch of the same repeat: the physical limit of this disk
and this SQLite for those rows. Coda's extra work over it is the `runs`
projection (an insert and an update per run), encoding, and the hop through
aiosqlite's thread.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from benchmarks.harness import temp_dir
from benchmarks.journal_builder import one_task_history
from benchmarks.workload import Metric, Metrics, Workload
from coda.journal.codec import encode
from coda.journal.events import Event
from coda.journal.sqlite import SQLiteJournal
from coda.runtime.heap import settle_heap

EVENTS, QUICK_EVENTS = 200_000, 20_000
CALLERS = 500
_last_batch_mean = 100.0  # Coda's, from the latest repeat; raw SQLite uses it

Call = list[Event]


def caller_calls(total: int) -> list[list[Call]]:
    """Each caller's append calls, in order."""
    now = time.time()
    runs_per_caller = max(1, total // 6 // CALLERS)
    callers: list[list[Call]] = []
    for c in range(CALLERS):
        calls: list[Call] = []
        for r in range(runs_per_caller):
            events = one_task_history(f"run-{c:04d}-{r:05d}", now, finished=True)
            calls += [events[:2], *([e] for e in events[2:])]
        callers.append(calls)
    return callers


async def _coda(path: Path, total: int) -> Metrics:
    global _last_batch_mean
    callers = caller_calls(total)
    # The collector set as `coda run` sets the supervisor's, once the input
    # is built: with CPython's defaults its older collections walk the
    # 200,000 prepared events, which no supervisor holds (0.26 s of a 2 s
    # repeat, measured). Put back afterwards: the suite's process goes on.
    threshold = gc.get_threshold()
    settle_heap()
    journal = await SQLiteJournal.open(path, synchronous="FULL")
    try:

        async def caller(calls: list[Call]) -> None:
            for call in calls:
                await journal.append(call)

        started = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in callers))
        elapsed = time.perf_counter() - started
        commits = journal.commits
    finally:
        await journal.close()
        gc.unfreeze()
        gc.set_threshold(*threshold)
    events = sum(len(call) for calls in callers for call in calls)
    _last_batch_mean = events / commits
    return {
        "events_per_s": events / elapsed,
        "batch_mean": events / commits,
        "commits_per_s": commits / elapsed,
        "count": events,
    }


async def _raw(path: Path, total: int, batch: int) -> Metrics:
    callers = caller_calls(total)
    # The calls in the order concurrent callers make them: one of each in turn.
    events = [
        event
        for position in range(max(len(c) for c in callers))
        for calls in callers
        if position < len(calls)
        for event in calls[position]
    ]
    journal = await SQLiteJournal.open(path, synchronous="OFF")  # the schema
    await journal.close()
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        submitted = [e for e in events if e.seq == 0]
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO runs (run_id, workflow, status, attempt, submitted_at)"
            " VALUES (?, 'one_task', 'running', 1, ?)",
            [(e.run_id, e.at) for e in submitted],
        )
        db.execute("COMMIT")
        keys = dict(db.execute("SELECT run_id, rk FROM runs"))
        rows = [
            (keys[e.run_id], e.seq, e.at, type(e).__name__, encode(e)) for e in events
        ]
        insert = "INSERT INTO events (rk, seq, at, type, body) VALUES (?, ?, ?, ?, ?)"
        started = time.perf_counter()
        for start in range(0, len(rows), batch):
            db.execute("BEGIN IMMEDIATE")
            db.executemany(insert, rows[start : start + batch])
            db.execute("COMMIT")
        elapsed = time.perf_counter() - started
    return {
        "events_per_s": len(rows) / elapsed,
        "batch_mean": float(batch),
        "commits_per_s": -(-len(rows) // batch) / elapsed,
        "count": len(rows),
    }


async def measure(system: str, quick: bool) -> Metrics:
    total = QUICK_EVENTS if quick else EVENTS
    with temp_dir("journal") as tmp:
        if system == "coda":
            return await _coda(tmp / "coda.db", total)
        if system == "sqlite":
            batch = max(1, round(_last_batch_mean))
            return await asyncio.to_thread(
                lambda: asyncio.run(_raw(tmp / "raw.db", total, batch))
            )
    raise ValueError(f"the journal benchmark has no system {system!r}")


WORKLOAD = Workload(
    name="journal",
    title=f"the journal alone: {EVENTS:,} events appended by {CALLERS} callers",
    metrics=(
        Metric("events_per_s", "events/s", target=(">=", 100_000)),
        Metric("batch_mean", "events per commit", ratio=False),
        Metric("commits_per_s", "commits/s"),
    ),
    measure=measure,
    peers=("sqlite",),
)
