"""The embedded journal: one SQLite file, appended to by group commit.

Schema
------
`events` is the history itself, append-only. Its integer primary key `id` is the
global order in which events were committed; `(rk, seq)` is unique and names an
event's position in its run's history; `body` is the event's JSON form from
`coda.journal.codec` (a BLOB; `CAST(body AS TEXT)` in the sqlite3 shell). `rk`
is the run's small integer key from `runs`, not its text id: rows go in at the
end of the table, and the index entries of the runs active now are small and
sit close together. Clustered by text run id instead, a transaction touching a
thousand runs rewrites a thousand full pages: with raw SQLite at
`synchronous=FULL` that measured about 40,000 events a second against about
130,000 this way. The `history` view shows events with their text run ids, for
people reading the file by hand. Statements, migrations and the opening of
files are in `coda.journal._sqlite_schema`.

Two projections are kept in the same transaction as the events they come from,
so that they can never disagree with the history:

* `runs`: one row per run with its workflow, status, current attempt, times,
  number of events and last result or error. The status is
  `coda.state.status_after(event)` of the run's last event that changes it;
  nothing is read back or folded here. The supervisor folds and validates; the
  journal only refuses positions already taken and events of runs it never saw
  submitted.
* `task_cache`: the result of every `TaskCompleted` that carries a cache key, by
  run and `coda.state.cache_token(key)`; the latest completion wins, as in the
  fold.

The schema version is `PRAGMA user_version`. `MIGRATIONS[v]` takes a journal
from version v to v + 1; an older journal is migrated in one transaction when
it is opened read-write. A journal newer than this code, or a file that is not
a Coda journal, is refused after looking at it through a read-only connection,
before anything (even switching to WAL) could write to it.

Group commit
------------
With `synchronous=FULL` every commit waits for the disk. `append` therefore
only prepares its rows (the events are encoded there, once, on the caller's
turn of the event loop) and queues them; one writer task takes every call
queued at that moment, merges them into one batch and has it written in one
transaction (one `executemany` per statement), then releases each caller.
Calls that arrive while a transaction is being written wait for the next one,
which is what makes batches large exactly when the load is high. Within a
batch, the changes of all calls to one run are merged first, so its `runs` row
is written once per transaction, not once per event. A caller is released only
once its own events are durable, and within the file events keep the order of
the calls.

The writer's thread
-------------------
The writer's connection is a plain `sqlite3` connection owned by a thread of
its own (`_Writer`), and a whole transaction is one function call on that
thread: one hop from the event loop and one back. Through aiosqlite, which the
rest of Coda uses, every statement is a hop of its own (a queue to its thread,
then a wake-up of the event loop to resume), five or six per transaction, and
aiosqlite has no public way to run a function on its thread. Reads keep
aiosqlite. The thread also knows the key `rk` of every run it wrote to or
looked up (`_Writer.keys`), so that events, cache rows and `runs` updates go in
by key; a run it does not know is looked up once, in the transaction. A
finished run is forgotten (a reopened one is looked up again), and the table is
halved past `_KEYS_MAX` runs, so that it stays small however many runs pass
through.

Failures
--------
Each call is atomic, but one bad call must not take a thousand good ones down
with it. When a transaction fails it is rolled back and, if the error can
belong to one call (a position already taken, an unknown run, a full disk that
a smaller transaction may still fit), its calls are split in halves and retried
until the failing ones are alone: good calls commit, the bad call gets a
`JournalError` that says what went wrong and what to do, and nothing of it is
written. One bad call among n costs about 2 log2(n) transactions, not n.
Errors that belong to the file and not to a call (I/O error, lock held by
another process, damaged or read-only file) fail the calls of the batch at
once: retrying them would only hammer a failing disk or wait out the lock
again. Either way the file is left as it was before the failed transaction
and stays usable.

Reading
-------
Reads go through a second, read-only connection. Under WAL, readers see the
last commit and never wait for the writer; nor can they see the writer's
uncommitted transaction, which they would through the writer's connection.
`read_history_sync` and `read_runs_sync` serve CLI commands the same way without
an event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson

from coda.errors import JournalError
from coda.journal import _sqlite_schema as schema
from coda.journal._sqlite_schema import read_history_sync, read_runs_sync
from coda.journal.base import RunSummary
from coda.journal.codec import decode, encode
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
from coda.values import dumps, loads

__all__ = ["SYNCHRONOUS_MODES", "SQLiteJournal", "read_history_sync", "read_runs_sync"]

logger = logging.getLogger(__name__)

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL")
_NOTHING = "nothing of this append was written"
_FINISHED = frozenset(s.value for s in RunStatus if s.finished)
# Run keys the writer remembers at most (about 100 bytes each); see `_Writer`.
_KEYS_MAX = 100_000
_T = TypeVar("_T")


class _RunDelta:
    """What one append, or a batch of them, changes in one run's `runs` row."""

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
        "updated_at",
    )

    def __init__(self, run_id: str, first_seq: int) -> None:
        self.run_id = run_id
        self.submit: tuple[str, float] | None = None  # (workflow, submitted_at)
        self.status: str | None = None  # None: unchanged
        self.attempt: int | None = None
        self.updated_at = 0.0
        self.first_seq = first_seq  # position of the first event this delta appends
        self.count = 0
        self.result_set = False
        self.result: str | None = None
        self.error_set = False
        self.error: str | None = None

    def copy(self) -> _RunDelta:
        other = _RunDelta(self.run_id, self.first_seq)
        other.submit = self.submit
        other.merge(self)
        return other

    def merge(self, later: _RunDelta) -> None:
        """Apply `later`, the delta of a later call, on top of this one."""
        if later.first_seq != self.first_seq + self.count:
            raise _NotContiguous(1)
        if later.status is not None:
            self.status = later.status
        if later.attempt is not None:
            self.attempt = later.attempt
        self.updated_at = later.updated_at
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
            self.updated_at,
            self.count,
            self.result,
            self.error,
        )

    def touches_only(self) -> bool:
        """Whether the delta changes only the count and time of the run."""
        unchanged = self.status is None and self.attempt is None
        return unchanged and not (self.result_set or self.error_set)

    def touch_row(self, rk: int) -> tuple[Any, ...]:
        return (self.updated_at, self.count, rk, self.first_seq)

    def update_row(self, rk: int) -> tuple[Any, ...]:
        return (
            self.status,
            self.attempt,
            self.updated_at,
            self.count,
            self.result_set,
            self.result,
            self.error_set,
            self.error,
            rk,
            self.first_seq,
        )


class _Append:
    """One call to `append`: its rows, ready to write, and the caller's future."""

    __slots__ = ("cache_rows", "deltas", "future", "rows", "submits")

    def __init__(self, events: Sequence[Event]) -> None:
        self.rows: list[tuple[str, int, float, str, bytes]] = []
        # Most calls have neither; the lists are made when needed (every
        # object less is a little less work for the garbage collector).
        self.cache_rows: list[tuple[str, str, str, int, int]] | tuple[()] = ()
        self.submits: list[str] | tuple[()] = ()
        self.deltas: dict[str, _RunDelta] = {}
        self.future: asyncio.Future[None] | None = None
        for event in events:
            self._add(event)

    def _add(self, event: Event) -> None:
        run_id, seq, kind = event.run_id, event.seq, type(event).__name__
        if not isinstance(run_id, str) or not run_id or type(seq) is not int or seq < 0:
            raise JournalError(
                f"cannot append {kind} with run_id={run_id!r}, seq={seq!r}: a run "
                f"id is a non-empty str and a position an int >= 0; {_NOTHING}"
            )
        try:
            body = encode(event)
        except (TypeError, ValueError) as exc:
            raise JournalError(
                f"run {run_id}: event #{seq} {kind} cannot be encoded ({exc}); "
                + _NOTHING
            ) from exc
        self.rows.append((run_id, seq, event.at, kind, body))

        delta = self.deltas.get(run_id)
        if delta is None:
            delta = self.deltas[run_id] = _RunDelta(run_id, seq)
        elif seq != delta.first_seq + delta.count:
            expected = delta.first_seq + delta.count
            what = "repeats a position of its own" if seq < expected else "leaves a gap"
            raise JournalError(
                f"run {run_id}: event #{seq} {kind} {what} (expected #{expected}); "
                + _NOTHING
            )
        delta.count += 1
        delta.updated_at = event.at
        status = _status_after(event)
        if status is not None:
            delta.status = status
        if isinstance(event, StepEvent):
            if isinstance(event, TaskCompleted) and event.cache_key is not None:
                token, result = cache_token(event.cache_key), dumps(event.result)
                row = (run_id, token, result.decode(), event.attempt, event.step)
                if not self.cache_rows:
                    self.cache_rows = [row]
                else:
                    self.cache_rows.append(row)
        elif isinstance(event, RunSubmitted):
            delta.submit = (event.workflow, event.at)
            if not self.submits:
                self.submits = [run_id]
            else:
                self.submits.append(run_id)
        elif isinstance(event, AttemptStarted):
            delta.attempt = event.attempt
        elif isinstance(event, RunCompleted):
            delta.result_set, delta.result = True, dumps(event.result).decode()
            delta.error_set, delta.error = True, None
        elif isinstance(event, (RunFailed, RunParked, AttemptFailed)):
            delta.error_set, delta.error = True, schema.error_json(event.error)
        elif isinstance(event, (RunRetried, RunResumed)):
            delta.error_set, delta.error = True, None

    def describe(self) -> str:
        runs = sorted(self.deltas)
        if len(runs) == 1:
            where = f"run {runs[0]} (#{self.rows[0][1]}..#{self.rows[-1][1]})"
        else:
            where = f"runs {', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''}"
        return f"append of {len(self.rows)} event(s) to {where}"


class _Batch:
    """The calls of one transaction, merged: what each statement writes.

    Made on the event loop; merging may raise `_NotContiguous`. The rows of the
    `runs` updates, the events and the cache need the runs' keys, which only
    the writer's thread knows: it finishes them.
    """

    __slots__ = ("cache_rows", "deltas", "events", "finished", "inserts")

    def __init__(self, calls: list[_Append]) -> None:
        self.events: list[tuple[str, int, float, str, bytes]] = []
        self.cache_rows: list[tuple[str, str, str, int, int]] = []
        merged: dict[str, _RunDelta] = {}
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
        self.inserts = [d.insert_row() for d in merged.values() if d.submit is not None]
        self.deltas = [d for d in merged.values() if d.submit is None]
        self.finished = [r for r, d in merged.items() if d.status in _FINISHED]


class _Writer:
    """The writer's connection, and the one thread that ever touches it.

    See "The writer's thread" above. `keys` belongs to the thread too: only
    `write` reads or changes it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: dict[str, int] = {}
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="coda-journal-writer")

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """`fn(connection)`, on the writer's thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, self._call, fn
        )

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._db is None:
            raise JournalError(f"journal {self.path} is closed for writing")
        return fn(self._db)

    async def open(self, synchronous: str) -> None:
        def connect() -> None:
            self._db = schema.open_writer(self.path, synchronous)

        await asyncio.get_running_loop().run_in_executor(self._thread, connect)

    async def close(self) -> None:
        """Close the connection (which checkpoints and removes the WAL)."""

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, close)
        finally:
            self._thread.shutdown(wait=False)

    def write(self, batch: _Batch) -> None:
        """Commit `batch` in one transaction, or nothing of it. On the thread."""
        db, keys = self._db, self.keys
        if db is None:
            raise JournalError(f"journal {self.path} is closed for writing")
        added: dict[str, int] = {}
        db.execute("BEGIN IMMEDIATE")
        try:
            # New runs first: everything else is written by the runs' keys.
            if batch.inserts:
                (last,) = db.execute(schema.LAST_KEY).fetchone()
                db.executemany(schema.INSERT_RUN, batch.inserts)
                added = dict(db.execute(schema.KEYS_AFTER, (last,)))
                keys.update(added)  # taken back below if the transaction fails
            self._look_up([d.run_id for d in batch.deltas if d.run_id not in keys])

            db.executemany(
                schema.INSERT_EVENT,
                [
                    (keys[r], seq, at, kind, body)
                    for r, seq, at, kind, body in batch.events
                ],
            )
            self._update_runs(db, batch.deltas)
            if batch.cache_rows:
                db.executemany(
                    schema.UPSERT_CACHE,
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

        for run_id in batch.finished:
            keys.pop(run_id, None)
        if len(keys) > _KEYS_MAX:
            for run_id in list(islice(keys, len(keys) // 2)):
                del keys[run_id]

    def _look_up(self, run_ids: list[str]) -> None:
        """Learn the keys of runs submitted before; `_UnknownRuns` if any is not."""
        if not run_ids:
            return
        assert self._db is not None
        found = dict(
            self._db.execute(schema.KEYS_OF, (orjson.dumps(run_ids).decode(),))
        )
        if len(found) < len(run_ids):
            raise _UnknownRuns([r for r in run_ids if r not in found])
        self.keys.update(found)  # valid whatever becomes of the transaction

    def _update_runs(self, db: sqlite3.Connection, deltas: list[_RunDelta]) -> None:
        """The `runs` rows of runs appended to, each only if its count is right."""
        keys = self.keys
        touches = [d.touch_row(keys[d.run_id]) for d in deltas if d.touches_only()]
        updates = [d.update_row(keys[d.run_id]) for d in deltas if not d.touches_only()]
        for statement, rows in (
            (schema.TOUCH_RUN, touches),
            (schema.UPDATE_RUN, updates),
        ):
            if rows:
                changed = db.executemany(statement, rows).rowcount
                if changed != len(rows):
                    raise _NotContiguous(len(rows) - changed)

    def _rollback(self, db: sqlite3.Connection) -> None:
        # SQLite rolls back by itself after some errors (a full disk, mostly).
        if not db.in_transaction:
            return
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("rolling back a failed append on %s failed", self.path)


class SQLiteJournal:
    """The `Journal` on one SQLite file; `await SQLiteJournal.open(path)`.

    `commits` counts the transactions that committed appended events; with many
    concurrent callers it grows much more slowly than the number of calls.
    """

    def __init__(
        self,
        path: Path,
        writer: _Writer | None,
        reader: aiosqlite.Connection,
    ) -> None:
        self.path = path
        self.commits = 0
        self._writer = writer
        self._reader = reader
        self._pending: list[_Append] = []
        self._wakeup = asyncio.Event()
        self._write_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        readonly: bool = False,
    ) -> SQLiteJournal:
        """Open the journal at `path`; read-write creates or migrates it.

        `synchronous` is SQLite's: FULL survives power loss; NORMAL survives a
        crash of the process but may lose the last commits on power loss; OFF
        is for tests and throwaway journals.
        """
        path = Path(path)
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous={synchronous!r}: choose one of "
                + ", ".join(SYNCHRONOUS_MODES)
            )
        # Look through a read-only connection first: a file this code must not
        # open is refused before anything could write to it.
        if readonly or path.exists():
            await schema.inspect(path, migrate=not readonly)
        writer = None
        if not readonly:
            writer = _Writer(path)
            try:
                await writer.open(mode)
            except BaseException:
                await writer.close()
                raise
        try:
            reader = await aiosqlite.connect(
                schema.ro_uri(path),
                uri=True,
                timeout=schema.BUSY_TIMEOUT,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            if writer is not None:
                await writer.close()
            raise JournalError(f"cannot open journal {path}: {exc}") from exc
        access = "read-only" if readonly else f"read-write, synchronous={mode}"
        logger.info("opened journal %s (%s)", path, access)
        return cls(path, writer, reader)

    async def __aenter__(self) -> SQLiteJournal:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Commit what is queued, then close the file. Appending after this fails."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._write_task is not None:
                self._wakeup.set()
                await self._write_task
        finally:
            await self._reader.close()
            # The writer closes last, so that it checkpoints and removes the WAL.
            if self._writer is not None:
                await self._writer.close()
            logger.info("closed journal %s", self.path)

    # -- appending ---------------------------------------------------------------

    async def append(self, events: Sequence[Event]) -> None:
        """Append events durably; return once they are committed.

        All of `events` are committed or none. A `JournalError` says which and
        why; the journal stays usable. If the caller is cancelled while waiting,
        its events may still be committed: the history is the truth.
        """
        if self._closed or self._writer is None:
            why = "closed" if self._closed else "opened read-only"
            raise JournalError(f"journal {self.path} is {why}; nothing was written")
        if not events:
            return
        call = _Append(events)
        future = call.future = asyncio.get_running_loop().create_future()
        self._pending.append(call)
        if self._write_task is None or self._write_task.done():
            self._write_task = asyncio.create_task(
                self._write_loop(), name=f"coda journal writer {self.path}"
            )
        self._wakeup.set()
        await future

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            try:
                await self._commit(batch)
            except BaseException as exc:
                # `_commit` settles every call itself; reaching here is a bug or
                # the event loop shutting down. Never leave a caller hanging.
                error = JournalError(
                    f"appending to journal {self.path} failed unexpectedly "
                    f"({exc!r}); whether it was written, the history tells"
                )
                for call in batch:
                    _settle(call, error)
                if isinstance(exc, Exception):
                    logger.exception("journal writer for %s failed", self.path)
                    continue
                for call in self._pending:
                    _settle(call, error)
                self._pending.clear()
                raise

    def _take_batch(self) -> list[_Append]:
        """Every queued call, up to one that submits a run the batch already has.

        The `runs` row of a submitted run is inserted before any event of the
        batch, so a call submitting run X after another call's events for X
        would make those events look valid. Cut there; the rest waits.
        """
        seen: set[str] = set()
        cut = len(self._pending)
        for index, call in enumerate(self._pending):
            if call.submits and not seen.isdisjoint(call.submits):
                cut = index
                break
            seen.update(call.deltas)
        batch, self._pending = self._pending[:cut], self._pending[cut:]
        return batch

    async def _commit(self, calls: list[_Append]) -> None:
        """Commit `calls` in one transaction, or as many of them as can be."""
        try:
            await self._transaction(calls)
        except Exception as exc:
            if len(calls) > 1 and _per_call(exc):
                logger.debug(
                    "transaction of %d appends to %s failed (%s); retrying halves",
                    len(calls),
                    self.path,
                    exc,
                )
                middle = len(calls) // 2
                await self._commit(calls[:middle])
                await self._commit(calls[middle:])
                return
            for call in calls:
                error = await self._explain(exc, call)
                logger.warning("%s", error)
                _settle(call, error)
            return
        for call in calls:
            _settle(call, None)

    async def _transaction(self, calls: list[_Append]) -> None:
        assert self._writer is not None
        started = time.perf_counter()
        batch = _Batch(calls)
        writer = self._writer
        await writer.call(lambda _: writer.write(batch))
        self.commits += 1
        logger.debug(
            "committed %d events of %d appends to %s in %.1f ms",
            len(batch.events),
            len(calls),
            self.path,
            (time.perf_counter() - started) * 1000,
        )

    async def _explain(self, exc: Exception, call: _Append) -> JournalError:
        """The error a failed call gets: what went wrong, and what to do."""
        what, text = call.describe(), str(exc)
        if isinstance(exc, _UnknownRuns):
            missing = [r for r in exc.runs if r in call.deltas] or exc.runs
            return JournalError(
                f"{what}: the journal has no RunSubmitted for run "
                f"{', '.join(missing)}; a run's history starts with its "
                f"submission; {_NOTHING}"
            )
        if isinstance(exc, sqlite3.IntegrityError):
            if "events.rk, events.seq" in text:
                return JournalError(f"{what}: {await self._taken(call)}; {_NOTHING}")
            if "runs.run_id" in text:
                return JournalError(
                    f"{what}: the run was submitted already; a run id is submitted "
                    f"once (make a new id for a new run); {_NOTHING}"
                )
        code = exc.sqlite_errorcode & 0xFF if isinstance(exc, sqlite3.Error) else -1
        where, folder = f"journal {self.path}", self.path.absolute().parent
        if code == sqlite3.SQLITE_FULL:
            advice = f"the disk is full: free space on {folder}, then append again"
        elif code == sqlite3.SQLITE_IOERR:
            advice = f"I/O error on {where}: check the disk, then run `coda doctor`"
        elif code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            advice = (
                f"{where} stayed locked by another process for over "
                f"{schema.BUSY_TIMEOUT:g}s: is another supervisor writing to it?"
            )
        elif code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
            advice = f"{where} cannot be written: check the permissions on {folder}"
        elif code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            advice = f"{where} is damaged: stop writing to it and run `coda doctor`"
        else:
            advice = f"{type(exc).__name__} writing to {where}"
        return JournalError(f"{what} failed ({text}); {advice}; {_NOTHING}")

    async def _taken(self, call: _Append) -> str:
        """Which of a call's positions were already in the journal, in words."""
        wanted: dict[str, list[int]] = {}
        for run_id, seq, *_ in call.rows:
            wanted.setdefault(run_id, []).append(seq)
        taken = [
            f"#{row[0]} of run {run_id}"
            for run_id, seqs in wanted.items()
            for row in await self._query(schema.TAKEN, run_id, orjson.dumps(seqs))
        ]
        if not taken:
            return "it repeats a position of its own"
        return (
            f"position {', '.join(taken[:5])} is already taken: is another process "
            "appending to this run, or is the caller's state of the run stale?"
        )

    async def _query(self, sql: str, *params: str | bytes) -> list[Any]:
        """Look something up for an error message; nothing if that fails too."""
        assert self._writer is not None
        args = [p.decode() if isinstance(p, bytes) else p for p in params]
        try:
            return await self._writer.call(lambda db: db.execute(sql, args).fetchall())
        except (sqlite3.Error, JournalError):
            return []

    # -- reading -----------------------------------------------------------------

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> Iterable[Any]:
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")
        try:
            return await self._reader.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise JournalError(f"reading journal {self.path} failed: {exc}") from exc

    async def history(self, run_id: str) -> list[Event]:
        """Every event of one run, in order; empty for a run the journal lacks."""
        return [decode(row[0]) for row in await self._read(schema.HISTORY, (run_id,))]

    async def resolve(self, run_id_or_prefix: str) -> str:
        params = schema.prefix_params(run_id_or_prefix)
        matches = [row[0] for row in await self._read(schema.PREFIX, params)]
        return schema.pick_run(run_id_or_prefix, matches, self.path)

    async def run(self, run_id: str) -> RunSummary | None:
        rows = await self._read(schema.SUMMARY + " WHERE run_id = ?", (run_id,))
        return next((schema.summary(row) for row in rows), None)

    async def runs(
        self,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
    ) -> list[RunSummary]:
        sql, params = schema.runs_query(status, workflow, limit)
        return [schema.summary(row) for row in await self._read(sql, params)]

    async def unfinished(self) -> dict[str, list[Event]]:
        """Histories of the runs whose status is not finished, in one query."""
        rows = await self._read(schema.UNFINISHED_HISTORIES, schema.UNFINISHED)
        histories: dict[str, list[Event]] = {}
        unordered = False
        for run_id, seq, body in rows:
            history = histories.get(run_id)
            if history is None:
                history = histories[run_id] = []
            elif history[-1].seq > seq:
                unordered = True
            history.append(decode(body))
        # The plan yields each run's events in index order, by seq; SQLite does
        # not promise it without an ORDER BY, which would sort every row.
        if unordered:
            for history in histories.values():
                history.sort(key=lambda event: event.seq)
        return histories

    async def cached_result(self, run_id: str, cache_key: list[Any]) -> Any:
        """The result cached under `cache_key` in run `run_id`; KeyError if none."""
        token = cache_token(cache_key)
        for row in await self._read(schema.CACHED, (run_id, token)):
            return loads(row[0])
        raise KeyError(f"run {run_id} has no cached result for key {token}")

    async def integrity_problems(self) -> list[str]:
        """What `coda doctor` should report; empty when all is well. Changes nothing."""
        problems = [
            f"sqlite integrity check: {row[0]}"
            for row in await self._read("PRAGMA integrity_check")
            if row[0] != "ok"
        ]
        for table, rowid, parent, _ in await self._read("PRAGMA foreign_key_check"):
            problems.append(f"{table} row {rowid} names a run missing from {parent}")
        for run_id, counted, count, first, last in await self._read(
            schema.SEQ_PROBLEMS
        ):
            if count == 0:
                problems.append(f"run {run_id} has no events, not even its submission")
            elif first != 0 or last != count - 1:
                problems.append(
                    f"run {run_id}: its {count} events are at positions "
                    f"#{first}..#{last}, not #0..#{count - 1} without gaps"
                )
            if counted != count:
                problems.append(
                    f"run {run_id}: the runs table counts {counted} events, "
                    f"the history has {count}"
                )
        return problems


class _NotContiguous(Exception):
    """Appended events of a run do not start where its history ends."""

    def __init__(self, runs: int) -> None:
        super().__init__(
            f"{runs} run(s) would get events that do not continue their history "
            "(a gap or an overlap)"
        )


class _UnknownRuns(Exception):
    """Appended events of runs the journal never saw submitted."""

    def __init__(self, runs: list[str]) -> None:
        super().__init__(f"no RunSubmitted for run(s) {', '.join(runs[:5])}")
        self.runs = runs


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


def _per_call(exc: Exception) -> bool:
    """Whether `exc` may belong to one call of a batch rather than to the file."""
    if isinstance(exc, (_NotContiguous, _UnknownRuns)):
        return True
    if not isinstance(exc, sqlite3.Error):
        return False
    return exc.sqlite_errorcode & 0xFF in (
        sqlite3.SQLITE_CONSTRAINT,
        sqlite3.SQLITE_FULL,
    )


def _settle(call: _Append, error: BaseException | None) -> None:
    future = call.future
    if future is None or future.done():  # the caller gave up waiting
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
