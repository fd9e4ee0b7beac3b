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
files are in `coda.journal._sqlite_schema`; the preparing and writing of appends
in `coda.journal._sqlite_writer`; the checkpoints in
`coda.journal._sqlite_checkpoints`.

Two projections are kept in the same transaction as the events they come from,
so that they can never disagree with the history:

* `runs`: one row per run with its workflow, status, current attempt,
  submission time and last result or error. The status is
  `coda.state.status_after(event)` of the run's last event that changes it;
  nothing is read back or folded here. The events of tasks, most events, leave
  the row alone: the time of a run's last event and their number are read
  from `events` (the last by `(rk, seq)`) when a run is summarized. Rewriting
  the row for them cost about 5 % of the journal benchmark's rate. The
  supervisor folds and validates; the journal only refuses positions already
  taken, appends that do not continue their history where it ends (the
  writer knows each active run's end, see `Writer.ends`) and events of runs
  it never saw submitted.
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
turn of the event loop) and queues them. The calls queued go to the writer in
batches, one transaction per batch (one `executemany` per statement) and one
transaction at a time; each caller is released once the transaction holding
its call has committed. Calls that arrive while a transaction is being written
wait for the next one, which is what makes batches large exactly when the load
is high. Within a batch, the changes of all calls to one run are merged first,
so its `runs` row is written once per transaction, not once per event. Within
the file events keep the order of the calls, and a call is never split.

A batch starts at one of two moments. With the writer idle, the first call of
a turn of the event loop schedules a callback at the end of that turn, which
starts a transaction with every call the turn queued: the many callers that
one commit released come back on the same turn, and go together. When a
transaction ends, the next starts at once, in the callback that brings the
news from the writer's thread, with whatever queued meanwhile: those calls
have waited long enough, and the supervisor's one large call per turn goes out
as soon as the writer is free. Between a call and its transaction there is
thus at most the rest of its turn; between a commit and its callers resuming,
one turn. No task sits in between: each would cost a turn of its own.

Starting a transaction from within `append` once enough events are queued,
so that the rest of the turn's callers prepare their calls while SQLite
writes, was tried and measured slower (500 callers in lock step: about 59,000
events/s against 69,000, four interleaved pairs of runs). That overlap is not
to be had under the GIL: the writer's thread needs it to start, to bind every
row and to return from the commit, and the event loop's thread, while busy,
hands it over only every `sys.getswitchinterval()` (5 ms); SQLite lets go of
it in between for a few microseconds at a time, except while the disk syncs.
The halved batches cost commits, and each transaction waited at both ends.

The writer's thread
-------------------
The writer's connection is a plain `sqlite3` connection owned by a thread of
its own (`Writer`), and a whole transaction is one function call on that
thread: the batch is merged (`Batch`), its rows are keyed and written and
committed there, handed over with `Writer.submit` and answered by one
callback on the event loop. Through aiosqlite, which the rest of Coda uses,
every statement is a hop of its own (a queue to its thread, then a wake-up of
the event loop to resume), five or six per transaction, and aiosqlite has no
public way to run a function on its thread. Reads keep aiosqlite. The thread
also knows the key `rk` of every run it wrote to or looked up
(`Writer.keys`), so that events, cache rows and `runs` updates go in by key; a
run it does not know is looked up once, in the transaction. A finished run is
forgotten (a reopened one is looked up again), and the table is halved past
`KEYS_MAX` runs, so that it stays small however many runs pass through.

Small batches
-------------
On a quiet system a transaction holds a few events, and handing it to the
writer's thread and hearing back cost more than writing it: two wake-ups of
a sleeping thread, about 55 us at the median on this 2-core machine, against
50 us for the whole commit at `synchronous=OFF` and 120-300 us at FULL. So a
batch of at most `SMALL_BATCH` events is written on the event loop's thread
itself when the writer's thread has nothing to do (`Writer.idle`: no
checkpoint of its running). The loop waits for the disk meanwhile, as the
callers of that batch do anyway; what else arrives in that time goes into the
next batch. Under load the batches are larger and go to the thread, so that
the loop prepares the next batch while the disk syncs this one. An append's
latency on an idle journal, p50: 149 -> 55 us at OFF.

Failures
--------
Each call is atomic, but one bad call must not take a thousand good ones down
with it. When a transaction fails it is rolled back and, if the error can
belong to one call (a position already taken, an unknown run, a full disk that
a smaller transaction may still fit), its calls are split in halves and retried
until the failing ones are alone: good calls commit, the bad call gets a
`JournalError` that says what went wrong and what to do, and nothing of it is
written. One bad call among n costs about 2 log2(n) transactions, not n.
Calls queued meanwhile wait until the failed batch is settled, so that the
order of the calls holds through failures too.
Errors that belong to the file and not to a call (I/O error, lock held by
another process, damaged or read-only file) fail the calls of the batch at
once: retrying them would only hammer a failing disk or wait out the lock
again. Either way the file is left as it was before the failed transaction
and stays usable.

Checkpoints
-----------
Under WAL a commit only appends to the `-wal` file; a checkpoint copies the
pages in it into the database file and syncs that, after which the WAL may
start over from its beginning. Left to the writer's connection (SQLite's
`wal_autocheckpoint`, then every 10,000 pages, about 40 MB), the commit that
crossed the mark did it: on the journal benchmark a commit took 0.8 ms at the
median and up to 49 ms with the checkpoint, the five worst commits were a
quarter of all commit time, and every caller of that batch waited for them.
So the writer's connection does not checkpoint; `Checkpointer` does, on a
connection and thread of its own, with `PRAGMA wal_checkpoint(PASSIVE)`,
which never waits for or blocks the writer (nor holds the GIL while it
copies). Its connection has the writer's `synchronous`: at FULL the WAL is
synced before it is copied and the database before the WAL is reused. It
runs a round once about `CHECKPOINT_FRAMES` pages (32 MB) came in since the
last, at the pace they came, every 0.25 to 2 s while commits come: a page
rewritten by many commits is copied once, and the database synced once.

Copying is not enough: the WAL starts over only at a transaction that
begins with all of it copied, and under a steady load frames keep coming
while the checkpointer copies. Once the WAL is past `RESTART_FRAMES` pages
and the checkpointer's last round had little left to copy, the writer runs a
PASSIVE checkpoint itself, right after a commit (its callers already
released) and before the next transaction: it copies only what came since
that round, 4 to 20 ms measured under a steady load of 600,000 events, and
the next transaction starts the WAL over. Readers holding an old snapshot
keep any checkpoint from copying past it; past `HARD_FRAMES` pages (400 MB)
the writer runs a RESTART checkpoint instead, which waits up to the busy
timeout for them: a stall of the next batch, with a warning, rather than a
WAL without bound. On the journal benchmark the WAL grew to 40-59 MB (41.8 MB
before); appending 600,000 events without pause, to 60-88 MB, restarting
every second or so. A failed checkpoint (full disk, I/O error) is logged
once, fails no append (the events are in the WAL) and is tried again on the
next round; if the checkpointer's connection cannot be opened at all, the
writer checkpoints itself as before. `close` stops the checkpointer first:
the writer's connection, the last to close, checkpoints and removes the WAL.

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
from concurrent.futures import Future
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from coda.errors import JournalError
from coda.journal import _sqlite_schema as schema
from coda.journal._sqlite_schema import read_history_sync, read_runs_sync
from coda.journal._sqlite_writer import (
    NOTHING,
    Append,
    Batch,
    NotContiguous,
    UnknownRuns,
    Writer,
)
from coda.journal.base import RunSummary
from coda.journal.codec import decode
from coda.journal.events import Event
from coda.state import cache_token
from coda.values import loads

__all__ = ["SYNCHRONOUS_MODES", "SQLiteJournal", "read_history_sync", "read_runs_sync"]

logger = logging.getLogger(__name__)

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL")
# Events at most in a batch written on the event loop's thread (see "Small
# batches" above).
SMALL_BATCH = 16


class SQLiteJournal:
    """The `Journal` on one SQLite file; `await SQLiteJournal.open(path)`.

    `commits` counts the transactions that committed appended events; with many
    concurrent callers it grows much more slowly than the number of calls.
    """

    def __init__(
        self,
        path: Path,
        writer: Writer | None,
        reader: aiosqlite.Connection,
    ) -> None:
        self.path = path
        self.commits = 0
        self._writer = writer
        self._reader = reader
        self._pending: list[Append] = []  # calls queued, in order
        self._flush_soon = False  # `_flush` is scheduled
        # The calls being written, or being retried after a failure; None
        # while the writer's thread is idle.
        self._writing: list[Append] | None = None
        self._started = 0.0
        self._recovery: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # nothing being written
        self._idle.set()
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
            writer = Writer(path)
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
            while self._writing is not None or self._pending:
                if self._writing is None:
                    self._start()
                else:
                    await self._idle.wait()
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
        call = Append(events)
        future = call.future = asyncio.get_running_loop().create_future()
        self._pending.append(call)
        if self._writing is None and not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)
        await future

    def _flush(self) -> None:
        """At the end of a turn of the event loop: write what the turn queued."""
        self._flush_soon = False
        if self._writing is None and self._pending:
            self._start()

    def _start(self) -> None:
        """Write the next batch; nothing may be being written.

        A batch of a few events is written right here when the writer's
        thread is idle (see "Small batches"); any other goes to that thread.
        """
        calls = self._take_batch()
        self._writing = calls
        self._idle.clear()
        writer, loop = self._writer, asyncio.get_running_loop()
        assert writer is not None
        self._started = time.perf_counter()
        if writer.idle and sum(len(call.rows) for call in calls) <= SMALL_BATCH:
            try:
                writer.write(Batch(calls))
            except BaseException as exc:
                self._ended(exc)
            else:
                self._ended(None)
            return
        try:
            written = writer.submit(lambda _: writer.write(Batch(calls)))
        except BaseException as exc:
            self._give_up(calls, exc)
            self._next()
            return

        def done(written: Future[None]) -> None:  # on the writer's thread
            with suppress(RuntimeError):  # the event loop is closed
                loop.call_soon_threadsafe(self._ended, written.exception())

        written.add_done_callback(done)

    def _ended(self, exc: BaseException | None) -> None:
        """Release the callers of the transaction that ended; start the next one."""
        calls = self._writing or []
        if exc is not None:
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(calls, exc), name=f"coda journal recovery {self.path}"
            )
            return
        self.commits += 1
        logger.debug(
            "committed %d appends to %s in %.1f ms",
            len(calls),
            self.path,
            (time.perf_counter() - self._started) * 1000,
        )
        for call in calls:
            _settle(call, None)
        self._writing = None
        self._next()

    def _next(self) -> None:
        """With the writer's thread idle: start on what queued meanwhile."""
        if self._pending:
            self._start()
        else:
            self._idle.set()

    async def _recover(self, calls: list[Append], exc: BaseException) -> None:
        """Settle the calls of a failed transaction; commit those that can be."""
        try:
            if not isinstance(exc, Exception):
                raise exc
            await self._failed(calls, exc)
        except BaseException as unexpected:
            # `_failed` settles every call itself; reaching here is a bug or
            # the event loop shutting down. Never leave a caller hanging.
            self._give_up(calls, unexpected)
            if not isinstance(unexpected, Exception):
                self._give_up(self._pending, unexpected)
                self._pending.clear()
                raise
            logger.exception("journal writer for %s failed", self.path)
        finally:
            self._recovery = None
            if self._writing is calls:
                self._writing = None
        self._next()

    def _give_up(self, calls: list[Append], exc: BaseException) -> None:
        error = JournalError(
            f"appending to journal {self.path} failed unexpectedly "
            f"({exc!r}); whether it was written, the history tells"
        )
        for call in calls:
            _settle(call, error)
        if self._writing is calls:
            self._writing = None
            self._idle.set()

    def _take_batch(self) -> list[Append]:
        """Every queued call, up to one that submits a run the batch already has.

        The `runs` row of a submitted run is inserted before any event of the
        batch, so a call submitting run X after another call's events for X
        would make those events look valid. Cut there; the rest waits.
        """
        seen: set[str] = set()
        pending = self._pending
        for index, call in enumerate(pending):
            if call.submits and not seen.isdisjoint(call.submits):
                batch, self._pending = pending[:index], pending[index:]
                return batch
            seen.update(call.deltas)
        self._pending = []
        return pending

    async def _commit(self, calls: list[Append]) -> None:
        """Commit `calls` in one transaction, or as many of them as can be."""
        try:
            await self._transaction(calls)
        except Exception as exc:
            await self._failed(calls, exc)
            return
        for call in calls:
            _settle(call, None)

    async def _failed(self, calls: list[Append], exc: Exception) -> None:
        """Retry the calls of a failed transaction in halves, or fail them."""
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

    async def _transaction(self, calls: list[Append]) -> None:
        writer = self._writer
        assert writer is not None
        await writer.call(lambda _: writer.write(Batch(calls)))
        self.commits += 1

    async def _explain(self, exc: Exception, call: Append) -> JournalError:
        """The error a failed call gets: what went wrong, and what to do."""
        what, text = call.describe(), str(exc)
        if isinstance(exc, UnknownRuns):
            missing = [r for r in exc.runs if r in call.deltas] or exc.runs
            return JournalError(
                f"{what}: the journal has no RunSubmitted for run "
                f"{', '.join(missing)}; a run's history starts with its "
                f"submission; {NOTHING}"
            )
        if isinstance(exc, NotContiguous):
            return JournalError(f"{what}: {await self._misplaced(call)}; {NOTHING}")
        if isinstance(exc, sqlite3.IntegrityError):
            if "events.rk, events.seq" in text:
                return JournalError(f"{what}: {await self._misplaced(call)}; {NOTHING}")
            if "runs.run_id" in text:
                return JournalError(
                    f"{what}: the run was submitted already; a run id is submitted "
                    f"once (make a new id for a new run); {NOTHING}"
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
        return JournalError(f"{what} failed ({text}); {advice}; {NOTHING}")

    async def _misplaced(self, call: Append) -> str:
        """Why a call's events do not continue their runs' histories, in words."""
        wanted: dict[str, list[int]] = {}
        for run_id, seq, *_ in call.rows:
            wanted.setdefault(run_id, []).append(seq)
        taken = [
            f"#{row[0]} of run {run_id}"
            for run_id, seqs in wanted.items()
            for row in await self._query(schema.TAKEN, run_id, orjson.dumps(seqs))
        ]
        if taken:
            return (
                f"position {', '.join(taken[:5])} is already taken: is another "
                "process appending to this run, or is the caller's state of the "
                "run stale?"
            )
        for run_id, seqs in wanted.items():
            for (end,) in await self._query(schema.END_OF, run_id):
                if end is None and seqs[0] != 0:
                    return (
                        f"run {run_id} has no history yet: it starts at #0 with "
                        f"its submission, and this append starts at #{seqs[0]}"
                    )
                if end is not None and seqs[0] != end:
                    return (
                        f"run {run_id}'s history ends at #{end - 1}: an append must "
                        f"continue it at #{end}, and this one starts at #{seqs[0]} "
                        "(it would leave a gap)"
                    )
        # Its rows repeat a position among themselves, or it collided with
        # another call of its transaction that was then taken back.
        return "it does not continue its run's history (a gap or an overlap)"

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

    async def run(
        self, run_id: str, *, result_limit: int | None = None
    ) -> RunSummary | None:
        bounded = result_limit is not None
        if bounded:
            sql = schema.SUMMARY_BOUNDED + " WHERE run_id = ?2"
            params: tuple[Any, ...] = (result_limit, run_id)
        else:
            sql, params = schema.SUMMARY + " WHERE run_id = ?", (run_id,)
        rows = await self._read(sql, params)
        return next(iter(schema.summaries(rows, bounded)), None)

    async def runs(
        self,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        result_limit: int | None = None,
    ) -> list[RunSummary]:
        sql, params = schema.runs_query(status, workflow, limit, result_limit)
        rows = await self._read(sql, params)
        return schema.summaries(rows, result_limit is not None)

    async def unfinished(self) -> dict[str, list[Event]]:
        """Histories of the runs whose status is not finished, in one query.

        A run with an event that cannot be read is left out, with an error
        logged that names it.
        """
        rows = await self._read(schema.UNFINISHED_HISTORIES, schema.UNFINISHED)
        histories: dict[str, list[Event]] = {}
        unreadable: set[str] = set()
        unordered = False
        for run_id, seq, body in rows:
            if run_id in unreadable:
                continue
            try:
                event = decode(body)
            except JournalError as exc:
                # One damaged run must not keep every other from recovering
                # (nor the supervisor from serving): it is left as it is.
                logger.error(
                    "run %s cannot be recovered: its event #%d cannot be read "
                    "(%s); run `coda doctor` on %s. Leaving it untouched.",
                    run_id,
                    seq,
                    exc,
                    self.path,
                )
                unreadable.add(run_id)
                histories.pop(run_id, None)
                continue
            history = histories.get(run_id)
            if history is None:
                history = histories[run_id] = []
            elif history[-1].seq > seq:
                unordered = True
            history.append(event)
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
        for run_id, count, first, last in await self._read(schema.SEQ_PROBLEMS):
            if count == 0:
                problems.append(f"run {run_id} has no events, not even its submission")
            else:
                problems.append(
                    f"run {run_id}: its {count} events are at positions "
                    f"#{first}..#{last}, not #0..#{count - 1} without gaps"
                )
        return problems


def _per_call(exc: Exception) -> bool:
    """Whether `exc` may belong to one call of a batch rather than to the file."""
    if isinstance(exc, (NotContiguous, UnknownRuns)):
        return True
    if not isinstance(exc, sqlite3.Error):
        return False
    return exc.sqlite_errorcode & 0xFF in (
        sqlite3.SQLITE_CONSTRAINT,
        sqlite3.SQLITE_FULL,
    )


def _settle(call: Append, error: BaseException | None) -> None:
    future = call.future
    if future is None or future.done():  # the caller gave up waiting
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
