"""The embedded journal: one SQLite file, appended to by group commit.

Schema
------
`events` is the history itself, append-only. Its integer primary key `id` is the
global order in which events were committed; `(rk, seq)` is unique and names an
event's position in its run's history; `body` is the event's JSON form from
`coda.journal.codec` (a BLOB; `CAST(body AS TEXT)` in the sqlite3 shell). `rk`
is the run's small integer key from `runs`, not its text id: rows go in at the
end of the table and the index entries of the runs that are active now sit close
together, so a transaction that touches a thousand runs dirties tens of pages
rather than a thousand. That is most of the difference between 40,000 and well
over 100,000 events a second at `synchronous=FULL`. The `history` view shows
events with their text run ids, for people reading the file by hand.

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
only prepares its rows and queues them; one writer task takes every call queued
at that moment, writes them all in one transaction (one `executemany` per
statement), commits, and then releases each caller. Calls that arrive while a
transaction is being written wait for the next one, which is what makes batches
large exactly when the load is high. A caller is released only once its own
events are durable, and within the file events keep the order of the calls.

Failures
--------
Each call is atomic, but one bad call must not take a thousand good ones down
with it. When a transaction fails it is rolled back and, if the error can
belong to one call (a position already taken, an unknown run, a full disk that
a smaller transaction may still fit), its calls are split in halves and retried
until the failing ones are alone: good calls commit, the bad call gets a
`JournalError` that says what went wrong and what to do, and nothing of it is
written. Errors that belong to the file and not to a call (I/O error, lock held
by another process, damaged or read-only file) fail the calls of the batch at
once: retrying them would only hammer a failing disk or wait out the lock again.
Either way the file is left as it was before the failed transaction and stays
usable.

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
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from coda.errors import InternalError, JournalError, JournalVersionError, RunNotFound
from coda.journal.base import RunSummary
from coda.journal.codec import decode, encode
from coda.journal.events import (
    AttemptFailed,
    AttemptStarted,
    ErrorInfo,
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
from coda.state import RunStatus, cache_token, status_after
from coda.values import dumps, loads

__all__ = ["MIGRATIONS", "SQLiteJournal", "read_history_sync", "read_runs_sync"]

logger = logging.getLogger(__name__)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 0 -> 1: the first schema.
    (
        """CREATE TABLE runs (
            rk INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL UNIQUE,
            workflow TEXT NOT NULL,
            status TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            submitted_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            events INTEGER NOT NULL,
            result TEXT,
            error TEXT)""",
        "CREATE INDEX runs_by_submitted ON runs (submitted_at)",
        "CREATE INDEX runs_by_status ON runs (status, submitted_at)",
        "CREATE INDEX runs_by_workflow ON runs (workflow, submitted_at)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            rk INTEGER NOT NULL REFERENCES runs (rk),
            seq INTEGER NOT NULL,
            at REAL NOT NULL,
            type TEXT NOT NULL,
            body BLOB NOT NULL)""",
        "CREATE UNIQUE INDEX events_by_run ON events (rk, seq)",
        """CREATE TABLE task_cache (
            rk INTEGER NOT NULL REFERENCES runs (rk),
            cache_key TEXT NOT NULL,
            result TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            step INTEGER NOT NULL,
            PRIMARY KEY (rk, cache_key)) WITHOUT ROWID""",
        """CREATE VIEW history AS
            SELECT r.run_id, e.seq, e.at, e.type, CAST(e.body AS TEXT) AS body, e.id
            FROM events e JOIN runs r ON r.rk = e.rk""",
    ),
)
"""`MIGRATIONS[v]` holds the statements that take a journal from version v to v+1."""

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL")
BUSY_TIMEOUT = 5.0  # seconds to wait for another process's lock before failing
_CACHE_PAGES = -65536  # 64 MiB of page cache for the writer (negative: KiB)
# Checkpoint every ~40 MB of WAL rather than 4 MB: a page rewritten by many
# commits in between is copied into the database once.
_WAL_AUTOCHECKPOINT = 10000

_UNFINISHED = tuple(s.value for s in RunStatus if not s.finished)
_PER_CALL_CODES = {sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_FULL}

_INSERT_RUN = (
    "INSERT INTO runs (run_id, workflow, status, attempt, submitted_at, updated_at,"
    " events, result, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_EVENT = (
    "INSERT INTO events (rk, seq, at, type, body)"
    " VALUES ((SELECT rk FROM runs WHERE run_id = ?), ?, ?, ?, ?)"
)
_UPDATE_RUN = (
    "UPDATE runs SET status = coalesce(?1, status), attempt = coalesce(?2, attempt),"
    " updated_at = ?3, events = events + ?4,"
    " result = CASE WHEN ?5 THEN ?6 ELSE result END,"
    " error = CASE WHEN ?7 THEN ?8 ELSE error END"
    " WHERE run_id = ?9"
)
_UPSERT_CACHE = (
    "INSERT INTO task_cache (rk, cache_key, result, attempt, step)"
    " VALUES ((SELECT rk FROM runs WHERE run_id = ?), ?, ?, ?, ?)"
    " ON CONFLICT (rk, cache_key) DO UPDATE SET result = excluded.result,"
    " attempt = excluded.attempt, step = excluded.step"
)
_SUMMARY_COLUMNS = (
    "run_id, workflow, status, attempt, submitted_at, updated_at, events, result, error"
)
_HISTORY = (
    "SELECT body FROM events WHERE rk = (SELECT rk FROM runs WHERE run_id = ?)"
    " ORDER BY seq"
)
_PREFIX = (
    "SELECT run_id FROM runs WHERE run_id >= ? AND run_id < ? ORDER BY run_id LIMIT 6"
)
# Walk the unfinished runs by their status index and seek each one's events.
# Left to itself, the planner may scan every event instead (it did, once the
# statistics of a small journal were gathered), so the plan is spelled out.
_UNFINISHED_HISTORIES = (
    "SELECT r.run_id, e.seq, e.body FROM runs r INDEXED BY runs_by_status"
    " CROSS JOIN events e INDEXED BY events_by_run ON e.rk = r.rk"
    f" WHERE r.status IN ({', '.join('?' * len(_UNFINISHED))})"
)
_SEQ_PROBLEMS = (
    "SELECT r.run_id, r.events, count(e.seq), min(e.seq), max(e.seq)"
    " FROM runs r LEFT JOIN events e ON e.rk = r.rk GROUP BY r.rk"
    " HAVING count(e.seq) = 0 OR min(e.seq) != 0 OR max(e.seq) != count(e.seq) - 1"
    " OR r.events != count(e.seq)"
)


class _RunDelta:
    """What one append, or a batch of them, changes in one run's `runs` row."""

    __slots__ = (
        "attempt",
        "count",
        "error",
        "error_set",
        "result",
        "result_set",
        "run_id",
        "status",
        "submit",
        "updated_at",
    )

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.submit: tuple[str, float] | None = None  # (workflow, submitted_at)
        self.status: str | None = None
        self.attempt: int | None = None
        self.updated_at = 0.0
        self.count = 0
        self.result_set = False
        self.result: str | None = None
        self.error_set = False
        self.error: str | None = None

    def copy(self) -> _RunDelta:
        other = _RunDelta(self.run_id)
        other.merge(self)
        other.submit = self.submit
        return other

    def merge(self, later: _RunDelta) -> None:
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


class _Append:
    """One call to `append`: its rows, ready to write, and the caller's future."""

    __slots__ = ("cache_rows", "deltas", "future", "rows")

    def __init__(self, events: Sequence[Event]) -> None:
        self.rows: list[tuple[str, int, float, str, bytes]] = []
        self.cache_rows: list[tuple[str, str, str, int, int]] = []
        self.deltas: dict[str, _RunDelta] = {}
        self.future: asyncio.Future[None] | None = None
        for event in events:
            self._add(event)

    def _add(self, event: Event) -> None:
        run_id, seq = event.run_id, event.seq
        if not isinstance(run_id, str) or not run_id or type(seq) is not int or seq < 0:
            raise JournalError(
                f"cannot append {type(event).__name__} with run_id={run_id!r}, "
                f"seq={seq!r}: a run id is a non-empty str and a position an int "
                ">= 0; nothing of this append was written"
            )
        try:
            body = encode(event)
        except (TypeError, ValueError) as exc:
            raise JournalError(
                f"run {run_id}: event #{seq} {type(event).__name__} cannot be "
                f"encoded ({exc}); nothing of this append was written"
            ) from exc
        self.rows.append((run_id, seq, event.at, type(event).__name__, body))

        delta = self.deltas.get(run_id)
        if delta is None:
            delta = self.deltas[run_id] = _RunDelta(run_id)
        delta.count += 1
        delta.updated_at = event.at
        status = status_after(event)
        if status is not None:
            delta.status = status.value

        if isinstance(event, StepEvent):
            if isinstance(event, TaskCompleted) and event.cache_key is not None:
                self.cache_rows.append(
                    (
                        run_id,
                        cache_token(event.cache_key),
                        dumps(event.result).decode(),
                        event.attempt,
                        event.step,
                    )
                )
        elif isinstance(event, RunSubmitted):
            delta.submit = (event.workflow, event.at)
        elif isinstance(event, AttemptStarted):
            delta.attempt = event.attempt
        elif isinstance(event, RunCompleted):
            delta.result_set, delta.result = True, dumps(event.result).decode()
            delta.error_set, delta.error = True, None
        elif isinstance(event, (RunFailed, RunParked, AttemptFailed)):
            delta.error_set, delta.error = True, _error_json(event.error)
        elif isinstance(event, (RunRetried, RunResumed)):
            delta.error_set, delta.error = True, None

    def describe(self) -> str:
        runs = sorted({row[0] for row in self.rows})
        first, last = self.rows[0][1], self.rows[-1][1]
        where = (
            f"run {runs[0]} (#{first}..#{last})"
            if len(runs) == 1
            else (f"runs {', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''}")
        )
        return f"append of {len(self.rows)} event(s) to {where}"


def _error_json(error: ErrorInfo) -> str:
    return orjson.dumps(
        {
            "type": error.type,
            "message": error.message,
            "traceback": error.traceback,
            "types": list(error.types),
        }
    ).decode()


def _error_from_json(text: str) -> ErrorInfo:
    obj = orjson.loads(text)
    return ErrorInfo(
        type=obj["type"],
        message=obj["message"],
        traceback=obj.get("traceback", ""),
        types=tuple(obj.get("types", ())),
    )


def _summary(row: Sequence[Any]) -> RunSummary:
    run_id, workflow, status, attempt, submitted, updated, events, result, error = row
    return RunSummary(
        run_id=run_id,
        workflow=workflow,
        status=status,
        attempt=attempt,
        submitted_at=submitted,
        updated_at=updated,
        events=events,
        result=None if result is None else loads(result),
        error=None if error is None else _error_from_json(error),
    )


def _runs_query(
    status: str | None, workflow: str | None, limit: int
) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if status is not None:
        where.append("status = ?")
        params.append(status)
    if workflow is not None:
        where.append("workflow = ?")
        params.append(workflow)
    sql = f"SELECT {_SUMMARY_COLUMNS} FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    params.append(limit)
    return sql + " ORDER BY submitted_at DESC, rk DESC LIMIT ?", params


def _prefix_params(prefix: str) -> tuple[str, str]:
    # Every string that starts with `prefix` sorts in [prefix, prefix + U+10FFFF).
    return prefix, prefix + "\U0010ffff"


def _pick_run(prefix: str, matches: list[str], path: Path) -> str:
    if prefix in matches:
        return prefix
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunNotFound(
            f"no run with id or id prefix {prefix!r} in journal {path}; "
            "`coda ls` lists the runs"
        )
    shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise RunNotFound(
        f"run id prefix {prefix!r} is ambiguous in journal {path}: it matches "
        f"{shown}; give more characters"
    )


def _check_version(
    path: Path, version: int, tables: list[str], *, migrate: bool
) -> None:
    """Refuse a file this code must not open; say why and what to do."""
    target = len(MIGRATIONS)
    if version > target:
        raise JournalVersionError(
            f"journal {path} has schema version {version}, newer than the version "
            f"{target} this Coda supports: upgrade Coda to open it (the file was "
            "left untouched)"
        )
    if version == 0 and tables:
        raise JournalError(
            f"{path} is a SQLite database but not a Coda journal (it has tables "
            f"{', '.join(sorted(tables)[:5])} and no schema version); point Coda at "
            "its own journal file (the file was left untouched)"
        )
    if version == 0 and not migrate:
        raise JournalError(f"journal {path} is empty: no run was ever written to it")
    if version < target and not migrate:
        raise JournalError(
            f"journal {path} has schema version {version}, older than this Coda's "
            f"{target}; open it read-write once (start the supervisor) to migrate "
            "it, then read it again"
        )


def _not_a_journal(path: Path, exc: sqlite3.Error) -> JournalError:
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
        return JournalError(
            f"{path} is not a Coda journal (not a SQLite database: {exc}); point "
            "Coda at its journal file (the file was left untouched)"
        )
    return JournalError(f"cannot open journal {path}: {exc}")


def _ro_uri(path: Path) -> str:
    return path.absolute().as_uri() + "?mode=ro"


_LOOK = "PRAGMA user_version"
_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table'"


def _connect_ro_sync(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise JournalError(f"no journal at {path}: the file does not exist")
    try:
        conn = sqlite3.connect(_ro_uri(path), uri=True, timeout=BUSY_TIMEOUT)
        version = conn.execute(_LOOK).fetchone()[0]
        tables = [name for (name,) in conn.execute(_TABLES)]
    except sqlite3.Error as exc:
        raise _not_a_journal(path, exc) from exc
    try:
        _check_version(path, version, tables, migrate=False)
    except JournalError:
        conn.close()
        raise
    return conn


def read_history_sync(path: str | Path, run_id_or_prefix: str) -> list[Event]:
    """The history of one run, read without an event loop and without write locks."""
    path = Path(path)
    with closing(_connect_ro_sync(path)) as conn:
        rows = conn.execute(_PREFIX, _prefix_params(run_id_or_prefix)).fetchall()
        run_id = _pick_run(run_id_or_prefix, [r[0] for r in rows], path)
        return [decode(body) for (body,) in conn.execute(_HISTORY, (run_id,))]


def read_runs_sync(
    path: str | Path,
    status: str | None = None,
    workflow: str | None = None,
    limit: int = 100,
) -> list[RunSummary]:
    """`SQLiteJournal.runs`, read without an event loop and without write locks."""
    with closing(_connect_ro_sync(Path(path))) as conn:
        sql, params = _runs_query(status, workflow, limit)
        return [_summary(row) for row in conn.execute(sql, params)]


class SQLiteJournal:
    """The `Journal` on one SQLite file; `await SQLiteJournal.open(path)`.

    `commits` counts the transactions that committed appended events; with many
    concurrent callers it grows much more slowly than the number of calls.
    """

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection | None,
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
        """Open (read-write: create or migrate) the journal at `path`.

        `synchronous` is SQLite's: FULL survives power loss, NORMAL survives a
        crash of the process but may lose the last commits on power loss, OFF
        is for tests and throwaway journals.
        """
        path = Path(path)
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous={synchronous!r}: choose one of "
                f"{', '.join(SYNCHRONOUS_MODES)}"
            )
        # Look through a read-only connection first: a file this code must not
        # open is refused before anything could write to it.
        if readonly or path.exists():
            await _inspect(path, migrate=not readonly)
        writer = None if readonly else await _open_writer(path, mode)
        try:
            reader = await aiosqlite.connect(
                _ro_uri(path), uri=True, timeout=BUSY_TIMEOUT, isolation_level=None
            )
        except sqlite3.Error as exc:
            if writer is not None:
                await writer.close()
            raise JournalError(f"cannot open journal {path}: {exc}") from exc
        logger.info(
            "opened journal %s (%s, synchronous=%s)",
            path,
            "read-only" if readonly else "read-write",
            mode,
        )
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

    # -- appending -------------------------------------------------------------

    async def append(self, events: Sequence[Event]) -> None:
        """Append events durably; return once they are committed.

        All of `events` are committed or none. A `JournalError` says which and
        why; the journal stays usable. If the caller is cancelled while waiting,
        its events may still be committed: the history is the truth.
        """
        if self._closed:
            raise JournalError(f"journal {self.path} is closed; nothing was written")
        if self._writer is None:
            raise JournalError(
                f"journal {self.path} was opened read-only; nothing was written"
            )
        if not events:
            return
        call = _Append(events)
        future = call.future = asyncio.get_running_loop().create_future()
        self._pending.append(call)
        if self._write_task is None:
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
                # `_commit` settles every call itself; reaching here is a bug
                # or the event loop shutting down. Never leave a caller hanging.
                error = JournalError(
                    f"appending to journal {self.path} failed unexpectedly "
                    f"({exc!r}); whether it was written, its history tells"
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
            if any(d.submit is not None and r in seen for r, d in call.deltas.items()):
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
                    "a transaction of %d appends to %s failed (%s); retrying in halves",
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
        rows: list[tuple[str, int, float, str, bytes]] = []
        cache_rows: list[tuple[str, str, str, int, int]] = []
        merged: dict[str, _RunDelta] = {}
        copied: set[str] = set()
        for call in calls:
            rows.extend(call.rows)
            cache_rows.extend(call.cache_rows)
            for run_id, delta in call.deltas.items():
                into = merged.get(run_id)
                if into is None:
                    merged[run_id] = delta  # copied only if a second call merges in
                    continue
                if run_id not in copied:
                    into = merged[run_id] = into.copy()
                    copied.add(run_id)
                into.merge(delta)

        inserts, updates = [], []
        for d in merged.values():
            if d.submit is not None:
                workflow, submitted_at = d.submit
                status = d.status or RunStatus.PENDING.value
                inserts.append(
                    (
                        *(d.run_id, workflow, status, d.attempt or 0, submitted_at),
                        *(d.updated_at, d.count, d.result, d.error),
                    )
                )
            else:
                updates.append(
                    (
                        *(d.status, d.attempt, d.updated_at, d.count, d.result_set),
                        *(d.result, d.error_set, d.error, d.run_id),
                    )
                )

        db = self._writer
        await db.execute("BEGIN IMMEDIATE")
        try:
            if inserts:
                await db.executemany(_INSERT_RUN, inserts)
            await db.executemany(_INSERT_EVENT, rows)
            if updates:
                await db.executemany(_UPDATE_RUN, updates)
            if cache_rows:
                await db.executemany(_UPSERT_CACHE, cache_rows)
            await db.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise
        self.commits += 1
        logger.debug(
            "committed %d events of %d appends to %s in %.1f ms",
            len(rows),
            len(calls),
            self.path,
            (time.perf_counter() - started) * 1000,
        )

    async def _rollback(self) -> None:
        assert self._writer is not None
        # SQLite rolls back by itself after some errors (a full disk, mostly).
        if not self._writer.in_transaction:
            return
        try:
            await self._writer.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("rolling back a failed append on %s failed", self.path)

    async def _explain(self, exc: Exception, call: _Append) -> JournalError:
        """The error a failed call gets: what went wrong, and what to do."""
        what, nothing = call.describe(), "nothing of this append was written"
        text = str(exc)
        if isinstance(exc, sqlite3.IntegrityError):
            if "events.rk, events.seq" in text:
                return JournalError(f"{what}: {await self._taken(call)}; {nothing}")
            if ".rk" in text:
                runs = sorted(call.deltas)
                try:
                    known = await self._writer_read(
                        "SELECT run_id FROM runs WHERE run_id IN "
                        "(SELECT value FROM json_each(?))",
                        (orjson.dumps(runs).decode(),),
                    )
                    runs = [r for r in runs if r not in {row[0] for row in known}]
                except sqlite3.Error:
                    pass
                return JournalError(
                    f"{what}: the journal has no RunSubmitted for run "
                    f"{', '.join(runs)}; a run's history starts with its submission; "
                    f"{nothing}"
                )
            if "runs.run_id" in text:
                return JournalError(
                    f"{what}: the run was submitted already; a run id is submitted "
                    f"once (make a new id for a new run); {nothing}"
                )
        code = getattr(exc, "sqlite_errorcode", -1) & 0xFF
        where, folder = f"journal {self.path}", self.path.absolute().parent
        if code == sqlite3.SQLITE_FULL:
            advice = f"the disk is full: free space on {folder}, then append again"
        elif code == sqlite3.SQLITE_IOERR:
            advice = f"I/O error on {where}: check the disk, then run `coda doctor`"
        elif code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            advice = (
                f"{where} stayed locked by another process for over "
                f"{BUSY_TIMEOUT:g}s: is another supervisor writing to it?"
            )
        elif code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
            advice = f"{where} cannot be written: check the permissions on {folder}"
        elif code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            advice = f"{where} is damaged: stop writing to it and run `coda doctor`"
        else:
            advice = f"{type(exc).__name__} writing to {where}"
        return JournalError(f"{what} failed ({text}); {advice}; {nothing}")

    async def _taken(self, call: _Append) -> str:
        """Which of a call's positions were already in the journal, in words."""
        wanted: dict[str, list[int]] = {}
        for run_id, seq, *_ in call.rows:
            wanted.setdefault(run_id, []).append(seq)
        taken = []
        try:
            for run_id, seqs in wanted.items():
                rows = await self._writer_read(
                    "SELECT e.seq FROM events e JOIN runs r ON r.rk = e.rk WHERE"
                    " r.run_id = ? AND e.seq IN (SELECT value FROM json_each(?))"
                    " ORDER BY e.seq",
                    (run_id, orjson.dumps(seqs).decode()),
                )
                taken += [f"#{row[0]} of run {run_id}" for row in rows]
        except sqlite3.Error:
            return "a position it writes is already taken"
        if not taken:
            return "it repeats a position of its own"
        return (
            f"position {', '.join(taken[:5])} is already taken: is another process "
            "appending to this run, or is the caller's state of the run stale?"
        )

    async def _writer_read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        assert self._writer is not None
        return list(await self._writer.execute_fetchall(sql, params))

    # -- reading ---------------------------------------------------------------

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> Iterable[Any]:
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")
        try:
            return await self._reader.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise JournalError(f"reading journal {self.path} failed: {exc}") from exc

    async def history(self, run_id: str) -> list[Event]:
        """Every event of one run, in order; empty for a run the journal lacks."""
        return [decode(row[0]) for row in await self._read(_HISTORY, (run_id,))]

    async def resolve(self, run_id_or_prefix: str) -> str:
        if not run_id_or_prefix:
            raise RunNotFound("no run id given: give a run id or a prefix of one")
        rows = await self._read(_PREFIX, _prefix_params(run_id_or_prefix))
        return _pick_run(run_id_or_prefix, [row[0] for row in rows], self.path)

    async def run(self, run_id: str) -> RunSummary | None:
        sql = f"SELECT {_SUMMARY_COLUMNS} FROM runs WHERE run_id = ?"
        rows = list(await self._read(sql, (run_id,)))
        return _summary(rows[0]) if rows else None

    async def runs(
        self,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
    ) -> list[RunSummary]:
        sql, params = _runs_query(status, workflow, limit)
        return [_summary(row) for row in await self._read(sql, params)]

    async def unfinished(self) -> dict[str, list[Event]]:
        """Histories of the runs whose status is not finished, in one query."""
        histories: dict[str, list[Event]] = {}
        unordered = False
        for run_id, seq, body in await self._read(_UNFINISHED_HISTORIES, _UNFINISHED):
            history = histories.get(run_id)
            if history is None:
                history = histories[run_id] = []
            elif history[-1].seq > seq:
                unordered = True
            history.append(decode(body))
        # The plan yields each run's events in index order, by seq; SQLite does
        # not promise it without an ORDER BY, which would cost a sort of all rows.
        if unordered:
            for history in histories.values():
                history.sort(key=lambda event: event.seq)
        return histories

    async def cached_result(self, run_id: str, cache_key: list[Any]) -> Any:
        """The result cached under `cache_key` in run `run_id`; KeyError if none."""
        token = cache_token(cache_key)
        rows = list(
            await self._read(
                "SELECT c.result FROM task_cache c JOIN runs r ON r.rk = c.rk"
                " WHERE r.run_id = ? AND c.cache_key = ?",
                (run_id, token),
            )
        )
        if not rows:
            raise KeyError(f"run {run_id} has no cached result for key {token}")
        return loads(rows[0][0])

    async def integrity_problems(self) -> list[str]:
        """What `coda doctor` should report; empty when all is well. Changes nothing."""
        problems = [
            f"sqlite integrity check: {row[0]}"
            for row in await self._read("PRAGMA integrity_check")
            if row[0] != "ok"
        ]
        for table, rowid, parent, _ in await self._read("PRAGMA foreign_key_check"):
            problems.append(f"{table} row {rowid} names a run missing from {parent}")
        for run_id, projected, count, first, last in await self._read(_SEQ_PROBLEMS):
            if count == 0:
                problems.append(f"run {run_id} has no events, not even its submission")
            elif first != 0 or last != count - 1:
                problems.append(
                    f"run {run_id}: its {count} events are at positions "
                    f"#{first}..#{last}, not #0..#{count - 1} without gaps"
                )
            if projected != count:
                problems.append(
                    f"run {run_id}: the runs table counts {projected} events, "
                    f"the history has {count}"
                )
        return problems


def _per_call(exc: Exception) -> bool:
    """Whether `exc` may belong to one call of a batch rather than to the file."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", -1) & 0xFF in _PER_CALL_CODES
    return isinstance(exc, OverflowError)  # an integer too large for SQLite


def _settle(call: _Append, error: BaseException | None) -> None:
    future = call.future
    if future is None or future.done():  # the caller gave up waiting
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


async def _inspect(path: Path, *, migrate: bool) -> None:
    """Refuse, through a read-only connection, a file this code must not open."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise JournalError(f"no journal at {path}: it {what}")
    try:
        async with aiosqlite.connect(
            _ro_uri(path), uri=True, timeout=BUSY_TIMEOUT
        ) as conn:
            version = await _scalar(conn, _LOOK)
            tables = [row[0] for row in await conn.execute_fetchall(_TABLES)]
    except sqlite3.Error as exc:
        raise _not_a_journal(path, exc) from exc
    _check_version(path, version, tables, migrate=migrate)


async def _open_writer(path: Path, synchronous: str) -> aiosqlite.Connection:
    try:
        db = await aiosqlite.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open journal {path} for writing: {exc}") from exc
    try:
        await _migrate(db, path)
        mode = await _scalar(db, "PRAGMA journal_mode = WAL")
        if mode != "wal":
            raise JournalError(
                f"journal {path} cannot use write-ahead logging (SQLite stayed in "
                f"{mode!r} mode); keep the journal on a local file system"
            )
        for pragma in (
            f"PRAGMA synchronous = {synchronous}",
            f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}",
            f"PRAGMA cache_size = {_CACHE_PAGES}",
            f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT}",
        ):
            await db.execute(pragma)
    except BaseException as exc:
        await db.close()
        if isinstance(exc, sqlite3.Error):
            raise JournalError(f"cannot open journal {path}: {exc}") from exc
        raise
    return db


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Bring the journal to this code's schema version, all in one transaction."""
    target = len(MIGRATIONS)
    await db.execute("BEGIN IMMEDIATE")
    version = 0
    try:
        # Look again inside the transaction: another process may have created
        # or upgraded the file since `_inspect`.
        version = await _scalar(db, _LOOK)
        tables = [row[0] for row in await db.execute_fetchall(_TABLES)]
        _check_version(path, version, tables, migrate=True)
        for step in range(version, target):
            for statement in MIGRATIONS[step]:
                await db.execute(statement)
        if version != target:
            await db.execute(f"PRAGMA user_version = {target}")
        await db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            await db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise JournalError(
                f"migrating journal {path} from schema version {version} to {target} "
                f"failed ({exc}); it was left at version {version}"
            ) from exc
        raise
    if version != target:
        logger.info(
            "migrated journal %s from schema version %d to %d", path, version, target
        )


async def _scalar(db: aiosqlite.Connection, sql: str) -> Any:
    for row in await db.execute_fetchall(sql):
        return row[0]
    raise InternalError(f"{sql!r} returned no row; this is a bug, please report it")
