"""Appends prepared and written: the rows of each call, and the writer's thread.

`coda.journal.sqlite` explains how appends are grouped, written and retried;
this module holds the parts that do the work: `Append` turns one call's events
into rows and the changes it makes to each run's `runs` row (`RunDelta`),
`Batch` merges the calls of one transaction, and `Writer` owns the writer's
connection and its thread and writes a batch in one transaction there, by the
keys of the runs it knows (`coda.journal._sqlite_checkpoints` copies the WAL
into the database on a connection and thread of its own).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sqlite3
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from itertools import chain, islice
from pathlib import Path
from typing import Any, TypeVar

import orjson

from coda.errors import InternalError, JournalError
from coda.journal import _sqlite_schema as schema
from coda.journal._sqlite_checkpoints import Checkpointer
from coda.journal.codec import encode
from coda.journal.events import (
    AttemptFailed,
    AttemptStarted,
    Event,
    RunCompleted,
    RunFailed,
    RunParked,
    RunResumed,
    RunRetried,
    RunSubmitted,
    StepEvent,
    TaskCompleted,
)
from coda.state import RunStatus, cache_token, event_label, status_after
from coda.values import dumps

__all__ = [
    "NOTHING",
    "Append",
    "Batch",
    "ManyRows",
    "NotContiguous",
    "UnknownRuns",
    "Writer",
]

logger = logging.getLogger(__name__)

NOTHING = "nothing of this append was written"
FINISHED = frozenset(s.value for s in RunStatus if s.finished)
# Run keys the writer remembers at most (about 100 bytes each); see `Writer`.
KEYS_MAX = 100_000
_T = TypeVar("_T")


class RunDelta:
    """What one append, or a batch of them, changes in one run's `runs` row.

    `first_seq` and `count` place the delta's events in the run's history;
    the writer checks them against the history's end (`Writer.ends`).
    """

    __slots__ = (
        "attempt",
        "count",
        "error",
        "error_set",
        "first_seq",
        "result",
        "result_set",
        "run_id",
        "status",
        "submit",
    )

    def __init__(self, run_id: str, first_seq: int) -> None:
        self.run_id = run_id
        self.submit: tuple[str, float] | None = None  # (workflow, submitted_at)
        self.status: str | None = None  # None: unchanged
        self.attempt: int | None = None
        self.first_seq = first_seq  # position of the first event this delta appends
        self.count = 0
        self.result_set = False
        self.result: str | None = None
        self.error_set = False
        self.error: str | None = None

    def copy(self) -> RunDelta:
        other = RunDelta(self.run_id, self.first_seq)
        other.submit = self.submit
        other.merge(self)
        return other

    def merge(self, later: RunDelta) -> None:
        """Apply `later`, the delta of a later call, on top of this one."""
        if later.first_seq != self.first_seq + self.count:
            raise NotContiguous(1)
        if later.status is not None:
            self.status = later.status
        if later.attempt is not None:
            self.attempt = later.attempt
        self.count += later.count
        if later.result_set:
            self.result_set, self.result = True, later.result
        if later.error_set:
            self.error_set, self.error = True, later.error

    def insert_row(self) -> tuple[Any, ...]:
        """The `runs` row of a run this delta submits."""
        assert self.submit is not None
        workflow, submitted_at = self.submit
        return (
            self.run_id,
            workflow,
            self.status or RunStatus.PENDING.value,
            self.attempt or 0,
            submitted_at,
            self.result,
            self.error,
        )

    def changes_row(self) -> bool:
        """Whether the delta changes the run's `runs` row at all.

        Most deltas (those of task events alone) do not: the row holds no
        count or time of the last event, which are read from `events`.
        """
        changed = self.status is not None or self.attempt is not None
        return changed or self.result_set or self.error_set

    def update_row(self, rk: int) -> tuple[Any, ...]:
        return (
            self.status,
            self.attempt,
            self.result_set,
            self.result,
            self.error_set,
            self.error,
            rk,
        )


class Append:
    """One call to `append`: its rows, ready to write, and the caller's future.

    The body of each row is the event's JSON as `str`, written as a BLOB
    (`INSERT_EVENTS` casts it). orjson makes its bytes in a 1 KiB buffer that
    it shrinks with `realloc`; the hundreds kept alive until their commit
    then cost the allocator about a microsecond each, more than encoding
    itself. Decoded, a body is a small object of Python's own allocator and
    orjson's buffer is freed, and reused, at once.
    """

    __slots__ = ("cache_rows", "deltas", "future", "rows", "submits")

    def __init__(self, events: Sequence[Event]) -> None:
        rows: list[tuple[str, int, float, str, str]] = []
        deltas: dict[str, RunDelta] = {}
        self.rows, self.deltas = rows, deltas
        # Most calls have neither; the lists are made when needed (every
        # object less is a little less work for the garbage collector).
        self.cache_rows: list[tuple[str, str, str, int, int]] | tuple[()] = ()
        self.submits: list[str] | tuple[()] = ()
        self.future: asyncio.Future[None] | None = None
        delta: RunDelta | None = None
        # One pass, with the common case inline: this runs for every event
        # appended, on the event loop's thread.
        for event in events:
            cls, run_id, seq = type(event), event.run_id, event.seq
            if type(seq) is not int or seq < 0 or not isinstance(run_id, str):
                raise _refused(event)
            if delta is None or delta.run_id != run_id:
                delta = deltas.get(run_id)
                if delta is None:
                    if not run_id:
                        raise _refused(event)
                    delta = deltas[run_id] = RunDelta(run_id, seq)
            try:
                body = encode(event).decode()
            except (TypeError, ValueError) as exc:
                raise JournalError(
                    f"run {run_id}: event #{seq} {cls.__name__} cannot be encoded "
                    f"({exc}); {NOTHING}"
                ) from exc
            if seq != delta.first_seq + delta.count:
                raise _out_of_place(event, delta.first_seq + delta.count)
            rows.append((run_id, seq, event.at, cls.__name__, body))
            delta.count += 1
            status = _STATUS_OF.get(cls, _UNKNOWN)
            if status is _UNKNOWN:
                status = _status_after(event)
            if status is not None:
                delta.status = status
            effect = _EFFECTS.get(cls)
            if effect is None:
                effect = _EFFECTS[cls] = _effect_of(cls)
            if effect is not _Effect.NONE:
                self._apply(effect, event, delta)

    def _apply(self, effect: _Effect, event: Any, delta: RunDelta) -> None:
        """What an event of the few kinds that change more than the count does."""
        if effect is _Effect.CACHE:
            if event.cache_key is not None:
                token, result = cache_token(event.cache_key), dumps(event.result)
                row = (event.run_id, token, result.decode(), event.attempt, event.step)
                if not self.cache_rows:
                    self.cache_rows = [row]
                else:
                    self.cache_rows.append(row)
        elif effect is _Effect.SUBMIT:
            delta.submit = (event.workflow, event.at)
            if not self.submits:
                self.submits = [event.run_id]
            else:
                self.submits.append(event.run_id)
        elif effect is _Effect.ATTEMPT:
            delta.attempt = event.attempt
        elif effect is _Effect.RESULT:
            delta.result_set, delta.result = True, dumps(event.result).decode()
            delta.error_set, delta.error = True, None
        elif effect is _Effect.ERROR:
            delta.error_set, delta.error = True, schema.error_json(event.error)
        elif effect is _Effect.CLEAR_ERROR:
            delta.error_set, delta.error = True, None

    def describe(self) -> str:
        runs = sorted(self.deltas)
        if len(runs) == 1:
            where = f"run {runs[0]} (#{self.rows[0][1]}..#{self.rows[-1][1]})"
        else:
            where = f"runs {', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''}"
        return f"append of {len(self.rows)} event(s) to {where}"


class Batch:
    """The calls of one transaction, merged: what each statement writes.

    Made on the writer's thread, as the transaction's first step: merging may
    raise `NotContiguous`, which fails the transaction like any statement
    would. The rows of the `runs` updates, the events and the cache need the
    runs' keys, which only that thread knows: `Writer.write` finishes them.
    """

    __slots__ = ("cache_rows", "deltas", "events", "finished", "inserts")

    def __init__(self, calls: list[Append]) -> None:
        self.events: list[tuple[str, int, float, str, str]] = []
        self.cache_rows: list[tuple[str, str, str, int, int]] = []
        merged: dict[str, RunDelta] = {}
        copied: set[str] = set()
        for call in calls:
            self.events += call.rows
            self.cache_rows += call.cache_rows
            for run_id, delta in call.deltas.items():
                into = merged.get(run_id)
                if into is None:
                    merged[run_id] = delta  # copied only if another call merges in
                    continue
                if run_id not in copied:
                    into = merged[run_id] = into.copy()
                    copied.add(run_id)
                into.merge(delta)
        # Runs the batch submits (their rows are inserted), and the others.
        self.inserts = [d for d in merged.values() if d.submit is not None]
        self.deltas = [d for d in merged.values() if d.submit is None]
        self.finished = [r for r, d in merged.items() if d.status in FINISHED]


class ManyRows:
    """A statement that writes up to `CHUNKS[0]` rows at once: `run(db, rows)`.

    `executemany` runs its statement once per row, and the sqlite3 module
    lets go of the GIL around every run: while the event loop's thread is
    busy, which under load it is, the writer's thread waits to take the GIL
    back after each row. One statement for many rows (an INSERT with many
    VALUES rows, an UPDATE ... FROM a VALUES list) binds them all at once and
    runs once. Measured alone, 600 event rows take 1.4 us a row this way
    against 2.3 with `executemany`, and 256 `runs` updates 1.1 against 1.4.
    Rows go in chunks of the sizes in `CHUNKS` (600 rows: 256, 256, 64, 16,
    4, 4), so that a few statements, prepared once and cached by the
    connection, serve every batch.
    """

    CHUNKS = (256, 64, 16, 4, 1)

    def __init__(self, parts: tuple[str, str, str], max_variables: int) -> None:
        head, row, tail = parts
        self.columns = row.count("?")
        self.sql = {
            n: head + ", ".join([row] * n) + tail
            for n in self.CHUNKS
            if n * self.columns <= max_variables or n == 1
        }

    def run(self, db: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> int:
        """Write `rows`, in order; how many rows the statements changed."""
        values = list(chain.from_iterable(rows))
        width, start, left, changed = self.columns, 0, len(rows), 0
        for n, sql in self.sql.items():
            while left >= n:
                end = start + n * width
                changed += db.execute(sql, values[start:end]).rowcount
                start, left = end, left - n
        return changed


class _OneByOne:
    """`ManyRows` for an SQLite without `UPDATE ... FROM`: `executemany`."""

    def __init__(self, sql: str) -> None:
        self.sql = sql

    def run(self, db: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> int:
        return db.executemany(self.sql, rows).rowcount


class Writer:
    """The writer's connection, and the thread that does its work.

    See "The writer's thread" in `coda.journal.sqlite`. The connection and
    `keys` and `ends` are used by one thread at a time: the writer's thread,
    or the event loop's for a small batch written while that thread is idle
    (`idle`), never both. Only `write` reads or changes them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # The runs this writer knows: their keys, and how many events each
        # history holds (the position the next append must start at).
        self.keys: dict[str, int] = {}
        self.ends: dict[str, int] = {}
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="coda-journal-writer")
        # The last job handed to the thread: it runs them in order, so once
        # this one is done the thread is idle.
        self._last_job: Future[Any] | None = None
        self.checkpointer: Checkpointer | None = None
        self._prepare(999)  # SQLite's smallest limit; `open` asks the connection

    def _prepare(self, max_variables: int) -> None:
        self._insert_runs = ManyRows(schema.INSERT_RUNS, max_variables)
        self._insert_events = ManyRows(schema.INSERT_EVENTS, max_variables)
        self._upsert_cache = ManyRows(schema.UPSERT_CACHE, max_variables)
        self._updates: ManyRows | _OneByOne = _OneByOne(schema.UPDATE_RUN)
        if sqlite3.sqlite_version_info >= schema.UPDATE_FROM:
            self._updates = ManyRows(schema.UPDATE_RUNS, max_variables)

    @property
    def idle(self) -> bool:
        """Whether the thread has nothing to do, so that another may write."""
        job = self._last_job
        return job is None or job.done()

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """`fn(connection)`, on the writer's thread."""
        return await asyncio.wrap_future(self.submit(fn))

    def submit(self, fn: Callable[[sqlite3.Connection], _T]) -> Future[_T]:
        """`fn(connection)`, started on the writer's thread; its outcome to come."""
        job = self._last_job = self._thread.submit(self._call, fn)
        return job

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._db is None:
            raise JournalError(f"journal {self.path} is closed for writing")
        return fn(self._db)

    async def open(self, synchronous: str) -> None:
        def connect() -> None:
            db = self._db = schema.open_writer(self.path, synchronous)
            self._prepare(db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
            try:
                checkpoints = schema.open_checkpointer(self.path, synchronous)
            except sqlite3.Error as exc:
                logger.warning(
                    "cannot open a connection to checkpoint journal %s (%s): its "
                    "writer checkpoints every %d pages itself, stalling that commit",
                    self.path,
                    exc,
                    schema.WAL_AUTOCHECKPOINT,
                )
                db.execute(f"PRAGMA wal_autocheckpoint = {schema.WAL_AUTOCHECKPOINT}")
                return
            self.checkpointer = Checkpointer(self.path, checkpoints)
            # A journal dropped without `close` stops its checkpointer too.
            weakref.finalize(self, self.checkpointer.stop)

        await asyncio.get_running_loop().run_in_executor(self._thread, connect)

    async def close(self) -> None:
        """Close the connection (which checkpoints and removes the WAL).

        The checkpointer stops first, after its round if one is under way:
        the writer's connection must be the last one, and no checkpoint may
        run while it checkpoints on closing.
        """

        def close() -> None:
            if self.checkpointer is not None:
                self.checkpointer.close()
                self.checkpointer = None
            if self._db is not None:
                self._db.close()
                self._db = None

        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, close)
        finally:
            self._thread.shutdown(wait=False)

    def write(self, batch: Batch) -> None:
        """Commit `batch` in one transaction, or nothing of it.

        On the writer's thread, or on the event loop's while that is `idle`.
        """
        db, keys, ends = self._db, self.keys, self.ends
        if db is None:
            raise JournalError(f"journal {self.path} is closed for writing")
        added: dict[str, int] = {}
        db.execute("BEGIN IMMEDIATE")
        try:
            # New runs first: everything else is written by the runs' keys.
            if batch.inserts:
                (last,) = db.execute(schema.LAST_KEY).fetchone()
                self._insert_runs.run(db, [d.insert_row() for d in batch.inserts])
                added = dict(db.execute(schema.KEYS_AFTER, (last,)))
                keys.update(added)  # taken back below if the transaction fails
                if any(d.first_seq != 0 for d in batch.inserts):
                    raise NotContiguous(1)  # a history starts at #0
            self._look_up([d.run_id for d in batch.deltas if d.run_id not in keys])
            self._check_ends(batch.deltas)

            self._insert_events.run(
                db,
                [
                    (keys[r], seq, at, kind, body)
                    for r, seq, at, kind, body in batch.events
                ],
            )
            self._update_runs(db, batch.deltas)
            if batch.cache_rows:
                self._upsert_cache.run(
                    db,
                    [
                        (keys[r], token, result, a, s)
                        for r, token, result, a, s in batch.cache_rows
                    ],
                )
            db.execute("COMMIT")
        except BaseException:
            # The keys of runs inserted by a rolled back transaction may be
            # given to other runs next: forgetting them is what keeps events
            # from ever being written under another run's key.
            for run_id in added:
                del keys[run_id]
            self._rollback(db)
            raise

        for delta in batch.inserts:
            ends[delta.run_id] = delta.count
        for delta in batch.deltas:
            ends[delta.run_id] = delta.first_seq + delta.count
        checkpointer = self.checkpointer
        if checkpointer is not None:
            checkpointer.committed()
            if checkpointer.wanted is not None:
                # After this transaction's callers are released, before the
                # next transaction: the executor runs its jobs in order.
                mode, checkpointer.wanted = checkpointer.wanted, None
                with suppress(RuntimeError):  # closing: it checkpoints anyway
                    self.submit(lambda _: self._checkpoint(mode))

        for run_id in batch.finished:
            self._forget(run_id)
        if len(keys) > KEYS_MAX:
            for run_id in list(islice(keys, len(keys) // 2)):
                self._forget(run_id)

    def _checkpoint(self, mode: str) -> None:
        """Finish the checkpointer's work between two transactions, on the thread.

        The WAL starts over from its beginning only at a transaction that
        begins with every frame of it copied into the database. Under a
        steady load the checkpointer never gets there by itself: frames come
        in while it copies. The writer copies the last ones (those of the
        transactions committed since the checkpointer's last round) and then
        its next transaction starts the WAL over. Failing here fails no
        append: they are committed, in the WAL.
        """
        db = self._db
        if db is None:
            return
        started = time.perf_counter()
        try:
            ((busy, frames, done),) = db.execute(
                f"PRAGMA wal_checkpoint({mode})"
            ).fetchall()
        except sqlite3.Error as exc:
            logger.error(
                "checkpoint (%s) of journal %s by its writer failed (%s); appends "
                "go on, and the WAL grows until a checkpoint succeeds",
                mode,
                self.path,
                exc,
            )
            return
        logger.debug(
            "writer's %s checkpoint of journal %s: %d of %d WAL frames copied%s "
            "in %.1f ms",
            mode,
            self.path,
            done,
            frames,
            " (busy)" if busy else "",
            (time.perf_counter() - started) * 1000,
        )

    def _look_up(self, run_ids: list[str]) -> None:
        """Learn the keys and history ends of runs submitted before.

        `UnknownRuns` if any was never submitted.
        """
        if not run_ids:
            return
        assert self._db is not None
        found = self._db.execute(schema.KEYS_OF, (orjson.dumps(run_ids).decode(),))
        # Valid whatever becomes of the transaction: nothing of it is written yet.
        for run_id, rk, end in found:
            self.keys[run_id] = rk
            self.ends[run_id] = end
        missing = [r for r in run_ids if r not in self.keys]
        if missing:
            raise UnknownRuns(missing)

    def _check_ends(self, deltas: list[RunDelta]) -> None:
        """`NotContiguous` unless each delta starts where its run's history ends.

        The ends known here are the journal's unless another writer appended
        to a run meanwhile (a test may open two journals on one file): a run
        that fails is looked up again before its delta is refused.
        """
        ends = self.ends
        stale = [d for d in deltas if ends[d.run_id] != d.first_seq]
        if not stale:
            return
        self._look_up([d.run_id for d in stale])
        misplaced = sum(1 for d in stale if ends[d.run_id] != d.first_seq)
        if misplaced:
            raise NotContiguous(misplaced)

    def _forget(self, run_id: str) -> None:
        self.keys.pop(run_id, None)
        self.ends.pop(run_id, None)

    def _update_runs(self, db: sqlite3.Connection, deltas: list[RunDelta]) -> None:
        """The `runs` rows of runs whose status, attempt, result or error changed."""
        keys = self.keys
        rows = [d.update_row(keys[d.run_id]) for d in deltas if d.changes_row()]
        if rows and self._updates.run(db, rows) != len(rows):
            # Every key came from `runs`, whose rows are never deleted.
            raise InternalError(
                f"journal {self.path}: a run's row vanished from the runs table "
                "while its events were appended; run `coda doctor`"
            )

    def _rollback(self, db: sqlite3.Connection) -> None:
        # SQLite rolls back by itself after some errors (a full disk, mostly).
        if not db.in_transaction:
            return
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("rolling back a failed append on %s failed", self.path)


class NotContiguous(Exception):
    """Appended events of a run do not start where its history ends."""

    def __init__(self, runs: int) -> None:
        super().__init__(
            f"{runs} run(s) would get events that do not continue their history "
            "(a gap or an overlap)"
        )


class UnknownRuns(Exception):
    """Appended events of runs the journal never saw submitted."""

    def __init__(self, runs: list[str]) -> None:
        super().__init__(f"no RunSubmitted for run(s) {', '.join(runs[:5])}")
        self.runs = runs


class _Effect(enum.Enum):
    """What an event changes in its run's `runs` row beyond count and time."""

    NONE = enum.auto()
    CACHE = enum.auto()  # a task's result, cached if it has a key
    SUBMIT = enum.auto()
    ATTEMPT = enum.auto()
    RESULT = enum.auto()
    ERROR = enum.auto()
    CLEAR_ERROR = enum.auto()


# The first class that an event's class is, or derives from, names its effect.
_EFFECT_OF_CLASS: tuple[tuple[type, _Effect], ...] = (
    (TaskCompleted, _Effect.CACHE),
    (StepEvent, _Effect.NONE),
    (RunSubmitted, _Effect.SUBMIT),
    (AttemptStarted, _Effect.ATTEMPT),
    (RunCompleted, _Effect.RESULT),
    (RunFailed, _Effect.ERROR),
    (RunParked, _Effect.ERROR),
    (AttemptFailed, _Effect.ERROR),
    (RunRetried, _Effect.CLEAR_ERROR),
    (RunResumed, _Effect.CLEAR_ERROR),
)
_EFFECTS: dict[type, _Effect] = {}


def _effect_of(cls: type) -> _Effect:
    return next((e for c, e in _EFFECT_OF_CLASS if issubclass(cls, c)), _Effect.NONE)


def _refused(event: Event) -> JournalError:
    run_id, seq = event.run_id, event.seq
    return JournalError(
        f"cannot append {type(event).__name__} with run_id={run_id!r}, seq={seq!r}: "
        f"a run id is a non-empty str and a position an int >= 0; {NOTHING}"
    )


def _out_of_place(event: Event, expected: int) -> JournalError:
    what = "repeats a position of its own" if event.seq < expected else "leaves a gap"
    return JournalError(
        f"run {event.run_id}: event #{event.seq} {type(event).__name__} {what} "
        f"(expected #{expected}); {NOTHING}"
    )


def _status_after(event: Event) -> str | None:
    """`status_after(event).value`, remembered for the classes whose status is theirs.

    The status an event leads to follows from its label in the transition
    tables; for most classes that label is the class name, so the answer is
    the same for every event of the class and is worked out once.
    """
    cls = type(event)
    known = _STATUS_OF.get(cls, _UNKNOWN)
    if known is not _UNKNOWN:
        return known
    status = status_after(event)
    value = None if status is None else status.value
    if event_label(event) == cls.__name__:
        _STATUS_OF[cls] = value
    return value


_UNKNOWN = "?"
_STATUS_OF: dict[type, str | None] = {}
