"""`coda doctor`: check a journal, report every problem precisely, change nothing.

Three layers, each trusting the one below only once it has been checked:

1. the file: SQLite's own integrity check and foreign keys;
2. the histories: every run's events sit at positions 0..n-1 without gaps,
   each decodes, and together they fold without an illegal transition;
3. the projections: the `runs` row and the `task_cache` rows of each run equal
   what the fold of its events says.

The journal is opened read-only (SQLite's `mode=ro`), so running the doctor
beside a live supervisor is safe and never takes its write lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson

from coda.errors import CodaError
from coda.journal.codec import decode
from coda.journal.events import Event
from coda.journal.sqlite import SQLiteJournal
from coda.state import IllegalEvent, RunState, apply

__all__ = ["check_journal"]


async def check_journal(path: str | Path) -> list[str]:
    """Every problem found in the journal at `path`; empty when it is healthy."""
    journal = await SQLiteJournal.open(str(path), readonly=True)
    try:
        problems = await journal.integrity_problems()
    finally:
        await journal.close()
    if any(p.startswith("sqlite integrity check") for p in problems):
        return problems  # the file itself is damaged: reading on proves nothing
    with closing(
        sqlite3.connect(f"file:{Path(path).absolute()}?mode=ro", uri=True)
    ) as db:
        problems += list(_check_histories(db))
    return problems


def _check_histories(db: sqlite3.Connection) -> Iterator[str]:
    runs = {
        row[0]: row
        for row in db.execute(
            "SELECT rk, run_id, workflow, status, attempt, result FROM runs"
        )
    }
    cache: dict[int, dict[str, Any]] = {}
    for rk, key, result in db.execute("SELECT rk, cache_key, result FROM task_cache"):
        cache.setdefault(rk, {})[key] = orjson.loads(result)

    state: RunState | None = None
    current = None
    broken = False
    rows = db.execute("SELECT rk, seq, body FROM events ORDER BY rk, seq")
    for rk, seq, body in rows:
        if rk != current:
            if current is not None and not broken:
                yield from _compare(runs.get(current), state, cache.get(current, {}))
            current, state, broken = rk, None, False
        if broken:
            continue
        run_id = runs[rk][1] if rk in runs else f"#{rk}"
        try:
            event: Event = decode(body)
            state = apply(state, event)
        except IllegalEvent as exc:
            yield f"run {run_id}: {exc}"
            broken = True
        except CodaError as exc:
            yield f"run {run_id}: event #{seq} cannot be read: {exc}"
            broken = True
    if current is not None and not broken:
        yield from _compare(runs.get(current), state, cache.get(current, {}))


def _compare(row: Any, state: RunState | None, cached: dict[str, Any]) -> Iterator[str]:
    if row is None or state is None:
        return
    _, run_id, workflow, status, attempt, result = row
    expected = {
        "workflow": state.workflow,
        "status": state.status.value,
        "attempt": state.attempt,
    }
    actual = {"workflow": workflow, "status": status, "attempt": attempt}
    for field, want in expected.items():
        if actual[field] != want:
            yield (
                f"run {run_id}: the runs table says {field}={actual[field]!r}, "
                f"the fold of its events says {want!r}"
            )
    if state.status.value == "completed":
        stored = orjson.loads(result) if result is not None else None
        if stored != state.result:
            yield f"run {run_id}: the runs table's result differs from RunCompleted's"
    want_cache = {key: value for key, (value, _) in state.cache.items()}
    if cached != want_cache:
        missing = sorted(set(want_cache) - set(cached))
        extra = sorted(set(cached) - set(want_cache))
        differ = sorted(
            k for k in set(cached) & set(want_cache) if cached[k] != want_cache[k]
        )
        yield (
            f"run {run_id}: task_cache disagrees with the history "
            f"(missing {missing}, unexpected {extra}, different {differ})"
        )
