"""The SQLite journal's schema and SQL; opening, checking and migrating files.

`coda.journal.sqlite` explains the schema and how it is written. This module
holds the rest: the migrations and statements, turning rows into values,
deciding from a read-only look whether a file may be opened at all, opening the
writer's connection (migrating the file first), and the synchronous read-only
readers for the CLI.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import attrs
import orjson

from coda.errors import InternalError, JournalError, JournalVersionError, RunNotFound
from coda.journal.base import RESULT_LEFT_OUT, RunSummary
from coda.journal.codec import decode
from coda.journal.events import ErrorInfo, Event
from coda.state import RunStatus
from coda.values import loads

__all__ = ["MIGRATIONS", "read_history_sync", "read_runs_sync"]

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
    # 1 -> 2: `runs` loses `updated_at` and `events` (the time and number of
    # the run's events), which every append of a task's events had to rewrite;
    # they are read from `events` by its index instead (see `SUMMARY`). The
    # table is rebuilt rather than altered: SQLite before 3.35 cannot drop a
    # column. The view names `runs`, so it goes first and comes back last.
    (
        "DROP VIEW history",
        """CREATE TABLE runs_2 (
            rk INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL UNIQUE,
            workflow TEXT NOT NULL,
            status TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            submitted_at REAL NOT NULL,
            result TEXT,
            error TEXT)""",
        """INSERT INTO runs_2 (rk, run_id, workflow, status, attempt, submitted_at,
            result, error)
            SELECT rk, run_id, workflow, status, attempt, submitted_at, result, error
            FROM runs ORDER BY rk""",
        # A key is never given twice, even that of a run no longer in the table.
        """UPDATE sqlite_sequence SET seq = max(seq, coalesce(
            (SELECT seq FROM sqlite_sequence WHERE name = 'runs'), 0))
            WHERE name = 'runs_2'""",
        "DROP TABLE runs",
        "ALTER TABLE runs_2 RENAME TO runs",
        "CREATE INDEX runs_by_submitted ON runs (submitted_at)",
        "CREATE INDEX runs_by_status ON runs (status, submitted_at)",
        "CREATE INDEX runs_by_workflow ON runs (workflow, submitted_at)",
        """CREATE VIEW history AS
            SELECT r.run_id, e.seq, e.at, e.type, CAST(e.body AS TEXT) AS body, e.id
            FROM events e JOIN runs r ON r.rk = e.rk""",
    ),
)
"""`MIGRATIONS[v]` holds the statements that take a journal from version v to v+1."""

# The oldest schema version this code reads without migrating the file, so that
# `coda ls`, `history`, `doctor` and `replay` work on a journal no supervisor of
# this version has opened yet (a backup on a read-only mount, say). Every read
# statement here must work on each version from this one: version 1 differs
# from 2 only by two columns of `runs` that no statement reads any more.
READABLE_FROM = 1

BUSY_TIMEOUT = 5.0  # seconds to wait for another process's lock before failing
# Page cache of the writer. It fills up as the journal grows and then stays
# full: at 64 MiB that was all of the supervisor's memory growth between
# 10,000 and 200,000 runs (W6). Appends measured as fast with 8, 16 and
# 64 MiB, also on a journal of a million events with random run ids; the
# pages it misses are read from the operating system's cache.
CACHE_KIB = 16384
# Checkpoints (see "Checkpoints" in `coda.journal.sqlite`). The writer's own
# automatic checkpoint is off; `_sqlite_checkpoints.Checkpointer` copies the WAL
# into the database on its own connection and thread, a round for about every
# CHECKPOINT_FRAMES frames (pages, 4 KiB) of WAL while commits come, paced
# between CHECKPOINT_PAUSES seconds apart: a page rewritten by many commits in
# between is copied once, and the database is synced once.
CHECKPOINT_FRAMES = 8_000
CHECKPOINT_PAUSES = (0.25, 2.0)
# WAL frames (pages, 4 KiB) past which the WAL should start over from its
# beginning: the writer then finishes the checkpointer's work itself, between
# two transactions, so that its next transaction can (about 33 MB of WAL).
RESTART_FRAMES = 8_000
# Frames past which readers holding old snapshots are waited for (the writer
# runs a RESTART checkpoint): about 400 MB of WAL.
HARD_FRAMES = 100_000
# The writer's automatic checkpoint, in frames, if the checkpointer's
# connection cannot be opened: checkpoints back on the commit path, but the
# WAL bounded.
WAL_AUTOCHECKPOINT = 10_000

# The writer writes many rows per statement (see
# `_sqlite_writer.ManyRows`): each is `(head, one row's values, tail)`.
INSERT_RUNS = (
    "INSERT INTO runs (run_id, workflow, status, attempt, submitted_at, result,"
    " error) VALUES ",
    "(?, ?, ?, ?, ?, ?, ?)",
    "",
)
# The writer knows the key `rk` of each run it writes to (see `KEYS_AFTER` and
# `KEYS_OF`), so that rows go in by key, without looking the text id up each.
# The body comes as the JSON's text (see `Append`) and is stored as its bytes.
INSERT_EVENTS = (
    "INSERT INTO events (rk, seq, at, type, body) VALUES ",
    "(?, ?, ?, ?, CAST(? AS BLOB))",
    "",
)
# Only events that change a run's status, attempt, result or error touch its
# `runs` row; those of tasks, most events, leave it alone.
UPDATE_RUN = (
    "UPDATE runs SET status = coalesce(?1, status), attempt = coalesce(?2, attempt),"
    " result = CASE WHEN ?3 THEN ?4 ELSE result END,"
    " error = CASE WHEN ?5 THEN ?6 ELSE error END"
    " WHERE rk = ?7"
)
# The same, for many runs per statement (`UPDATE ... FROM`, SQLite 3.33 and
# later; a batch names each run once, so each row of `v` meets one run).
UPDATE_RUNS = (
    "UPDATE runs SET status = coalesce(v.column1, runs.status),"
    " attempt = coalesce(v.column2, runs.attempt),"
    " result = CASE WHEN v.column3 THEN v.column4 ELSE runs.result END,"
    " error = CASE WHEN v.column5 THEN v.column6 ELSE runs.error END"
    " FROM (VALUES ",
    "(?, ?, ?, ?, ?, ?, ?)",
    ") AS v WHERE runs.rk = v.column7",
)
UPDATE_FROM = (3, 33, 0)
# Rows of one statement are written in order: of two completions with the
# same key, the later wins, as in the fold.
UPSERT_CACHE = (
    "INSERT INTO task_cache (rk, cache_key, result, attempt, step) VALUES ",
    "(?, ?, ?, ?, ?)",
    " ON CONFLICT (rk, cache_key) DO UPDATE SET result = excluded.result,"
    " attempt = excluded.attempt, step = excluded.step",
)
# AUTOINCREMENT: a new run's key is larger than any key the table ever held, so
# the runs inserted since `LAST_KEY` are exactly those with a larger key.
LAST_KEY = "SELECT coalesce(max(rk), 0) FROM runs"
KEYS_AFTER = "SELECT run_id, rk FROM runs WHERE rk > ?"
# How many events a run's history holds, for a query of `runs`: one seek in
# the events' index (histories run from #0 without gaps).
_COUNT = "(SELECT coalesce(max(e.seq) + 1, 0) FROM events e WHERE e.rk = runs.rk)"
# With each run's key, how many events its history holds: where the next
# append must start.
KEYS_OF = (
    f"SELECT run_id, rk, {_COUNT} FROM runs"
    " WHERE run_id IN (SELECT value FROM json_each(?))"
)
TAKEN = (
    "SELECT e.seq FROM events e JOIN runs r ON r.rk = e.rk"
    " WHERE r.run_id = ? AND e.seq IN (SELECT value FROM json_each(?)) ORDER BY e.seq"
)

# A run's last change and its number of events, from its last event: two
# seeks in the index of `events` (histories run from #0 without gaps).
_LAST_EVENT = (
    "coalesce((SELECT e.at FROM events e WHERE e.rk = runs.rk"
    f" ORDER BY e.seq DESC LIMIT 1), submitted_at), {_COUNT}"
)
END_OF = (
    "SELECT max(e.seq) + 1 FROM events e JOIN runs r ON r.rk = e.rk WHERE r.run_id = ?"
)
SUMMARY = (
    f"SELECT run_id, workflow, status, attempt, submitted_at, {_LAST_EVENT},"
    " result, error FROM runs"
)
# `SUMMARY` with a result of more than ?1 characters left unread (a last column
# says so, see `summaries`): `length` counts them inside SQLite, without Python
# holding the text.
SUMMARY_BOUNDED = (
    f"SELECT run_id, workflow, status, attempt, submitted_at, {_LAST_EVENT},"
    " CASE WHEN length(result) > ?1 THEN NULL ELSE result END, error,"
    " coalesce(length(result) > ?1, 0) FROM runs"
)
HISTORY = (
    "SELECT body FROM events WHERE rk = (SELECT rk FROM runs WHERE run_id = ?)"
    " ORDER BY seq"
)
PREFIX = (
    "SELECT run_id FROM runs WHERE run_id >= ? AND run_id < ? ORDER BY run_id LIMIT 6"
)
CACHED = (
    "SELECT c.result FROM task_cache c JOIN runs r ON r.rk = c.rk"
    " WHERE r.run_id = ? AND c.cache_key = ?"
)
UNFINISHED = tuple(s.value for s in RunStatus if not s.finished)
# Walk the unfinished runs by their status index and seek each one's events.
# Left to itself, the planner may scan every event instead (it did, once the
# statistics of a small journal were gathered), so the plan is spelled out.
UNFINISHED_HISTORIES = (
    "SELECT r.run_id, e.seq, e.body FROM runs r INDEXED BY runs_by_status"
    " CROSS JOIN events e INDEXED BY events_by_run ON e.rk = r.rk"
    f" WHERE r.status IN ({', '.join('?' * len(UNFINISHED))})"
)
SEQ_PROBLEMS = (
    "SELECT r.run_id, count(e.seq), min(e.seq), max(e.seq)"
    " FROM runs r LEFT JOIN events e ON e.rk = r.rk GROUP BY r.rk"
    " HAVING count(e.seq) = 0 OR min(e.seq) != 0 OR max(e.seq) != count(e.seq) - 1"
)
USER_VERSION = "PRAGMA user_version"
TABLES = "SELECT name FROM sqlite_master WHERE type = 'table'"


def error_json(error: ErrorInfo) -> str:
    info = {
        "type": error.type,
        "message": error.message,
        "traceback": error.traceback,
        "types": list(error.types),
    }
    return orjson.dumps(info).decode()


def _error_from_json(text: str) -> ErrorInfo:
    obj = orjson.loads(text)
    return ErrorInfo(
        type=obj["type"],
        message=obj["message"],
        traceback=obj.get("traceback", ""),
        types=tuple(obj.get("types", ())),
    )


def summary(row: Sequence[Any]) -> RunSummary:
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


def runs_query(
    status: str | None,
    workflow: str | None,
    limit: int,
    result_limit: int | None = None,
) -> tuple[str, list[Any]]:
    """The query of `Journal.runs`: newest first, filtered by status and workflow.

    With `result_limit`, a result of more characters is not read, and a last
    column says so (see `summaries`).
    """
    where: list[str] = []
    params: list[Any] = []
    columns = SUMMARY
    if result_limit is not None:
        columns = SUMMARY_BOUNDED
        params.append(result_limit)  # ?1; the `?` after it are ?2, ?3...
    if status is not None:
        where.append("status = ?")
        params.append(status)
    if workflow is not None:
        where.append("workflow = ?")
        params.append(workflow)
    sql = columns + (" WHERE " + " AND ".join(where) if where else "")
    params.append(limit)
    return sql + " ORDER BY submitted_at DESC, rk DESC LIMIT ?", params


def summaries(rows: Iterable[Sequence[Any]], bounded: bool) -> list[RunSummary]:
    """Summaries of `runs_query`'s rows; `bounded` if it had a `result_limit`."""
    if not bounded:
        return [summary(row) for row in rows]
    out = []
    for *row, left_out in rows:
        one = summary(row)
        out.append(attrs.evolve(one, result=RESULT_LEFT_OUT) if left_out else one)
    return out


def prefix_params(prefix: str) -> tuple[str, str]:
    # Every string that starts with `prefix` sorts in [prefix, prefix + U+10FFFF).
    return prefix, prefix + "\U0010ffff"


def pick_run(prefix: str, matches: list[str], path: Path) -> str:
    """The run `prefix` names among `matches` (from `PREFIX`), or `RunNotFound`."""
    if not prefix:
        raise RunNotFound("no run id given: give a run id or a prefix of one")
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


def check_version(
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
    if version < READABLE_FROM and not migrate:
        raise JournalError(
            f"journal {path} has schema version {version}, older than this Coda's "
            f"{target}; open it read-write once (start the supervisor) to migrate "
            "it, then read it again"
        )


def not_a_journal(path: Path, exc: sqlite3.Error) -> JournalError:
    if "not a database" in str(exc):
        return JournalError(
            f"{path} is not a Coda journal (not a SQLite database: {exc}); point "
            "Coda at its journal file (the file was left untouched)"
        )
    return JournalError(f"cannot open journal {path}: {exc}")


def look_at_file(path: Path) -> None:
    """Refuse a missing file, a non-SQLite file or a newer journal from its header.

    Plain file reads leave no trace; even a read-only SQLite connection may
    create the `-wal` and `-shm` files of a journal in WAL mode. The header
    holds the schema version as of the last checkpoint; a newer version still
    in the WAL is caught by the checks made through SQLite afterwards.
    """
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise JournalError(f"no journal at {path}: it {what}")
    with path.open("rb") as file:
        header = file.read(100)
    if not header:
        return  # empty: a journal yet to be created
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise not_a_journal(path, sqlite3.DatabaseError("file is not a database"))
    check_version(path, int.from_bytes(header[60:64], "big"), [], migrate=True)


def ro_uri(path: Path) -> str:
    """A URI that opens `path` read-only: no write lock, no change, ever.

    A reader of a WAL journal needs its shared-memory file (`-shm`), which
    SQLite makes beside the journal when no writer has it open: in a folder
    this process may not write to, that failed ("attempt to write a readonly
    database"), and `coda ls` worked only while a supervisor ran. With no
    `-wal` file beside the journal no writer has it open (the last one
    removed it when it closed), and the file is opened as immutable, which
    needs no shared memory. A supervisor starting meanwhile could change
    what such a reader sees; it is a reader of a moment, and a folder the
    reader may not write to is another user's.
    """
    path = path.absolute()
    uri = path.as_uri() + "?mode=ro"
    if not os.access(path.parent, os.W_OK) and not Path(f"{path}-wal").exists():
        uri += "&immutable=1"
    return uri


def _connect_ro_sync(path: Path) -> sqlite3.Connection:
    look_at_file(path)
    try:
        conn = sqlite3.connect(ro_uri(path), uri=True, timeout=BUSY_TIMEOUT)
        version = conn.execute(USER_VERSION).fetchone()[0]
        tables = [name for (name,) in conn.execute(TABLES)]
    except sqlite3.Error as exc:
        raise not_a_journal(path, exc) from exc
    try:
        check_version(path, version, tables, migrate=False)
    except JournalError:
        conn.close()
        raise
    return conn


@contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection; SQLite's errors while reading said as `JournalError`."""
    with closing(_connect_ro_sync(path)) as conn:
        try:
            yield conn
        except sqlite3.Error as exc:
            damaged = exc.sqlite_errorcode & 0xFF in (
                sqlite3.SQLITE_CORRUPT,
                sqlite3.SQLITE_NOTADB,
            )
            advice = (
                f"the file is damaged: stop writing to it and run `coda doctor {path}`"
                if damaged
                else "check the file and the disk, then try again"
            )
            raise JournalError(
                f"reading journal {path} failed ({exc}); {advice}"
            ) from exc


def read_history_sync(path: str | Path, run_id_or_prefix: str) -> list[Event]:
    """The history of one run, read without an event loop and without write locks."""
    path = Path(path)
    with _reading(path) as conn:
        rows = conn.execute(PREFIX, prefix_params(run_id_or_prefix)).fetchall()
        run_id = pick_run(run_id_or_prefix, [r[0] for r in rows], path)
        return [decode(body) for (body,) in conn.execute(HISTORY, (run_id,))]


def read_runs_sync(
    path: str | Path,
    status: str | None = None,
    workflow: str | None = None,
    limit: int = 100,
    result_limit: int | None = None,
) -> list[RunSummary]:
    """`SQLiteJournal.runs`, read without an event loop and without write locks."""
    with _reading(Path(path)) as conn:
        sql, params = runs_query(status, workflow, limit, result_limit)
        return summaries(conn.execute(sql, params), result_limit is not None)


async def inspect(path: Path, *, migrate: bool) -> None:
    """Refuse, through a read-only connection, a file this code must not open."""
    look_at_file(path)
    try:
        async with aiosqlite.connect(
            ro_uri(path), uri=True, timeout=BUSY_TIMEOUT
        ) as conn:
            version = next(iter(await conn.execute_fetchall(USER_VERSION)))[0]
            tables = [row[0] for row in await conn.execute_fetchall(TABLES)]
    except sqlite3.Error as exc:
        raise not_a_journal(path, exc) from exc
    check_version(path, version, tables, migrate=migrate)


def open_writer(path: Path, synchronous: str) -> sqlite3.Connection:
    """The writer's connection: the file created or migrated, in WAL mode.

    Blocking: `coda.journal.sqlite` calls it on the writer's own thread. The
    connection is then used by one thread at a time, that one or the event
    loop's (see `_sqlite_writer.Writer`).
    """
    try:
        db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open journal {path} for writing: {exc}") from exc
    try:
        _migrate(db, path)
        mode = _scalar(db, "PRAGMA journal_mode = WAL")
        if mode != "wal":
            raise JournalError(
                f"journal {path} cannot use write-ahead logging (SQLite stayed in "
                f"{mode!r} mode); keep the journal on a local file system"
            )
        for pragma in (
            f"synchronous = {synchronous}",
            f"busy_timeout = {int(BUSY_TIMEOUT * 1000)}",
            f"cache_size = -{CACHE_KIB}",
            "wal_autocheckpoint = 0",
            # A statement that writes many rows inside a transaction keeps
            # the pages it changes in a statement journal, to undo itself
            # alone should it fail. Past 64 KiB SQLite spills that to a
            # temporary file: under W1, 6.5 writes a run of 13 the writer
            # made. Kept in memory, it is at most the pages of one batch.
            "temp_store = MEMORY",
        ):
            db.execute(f"PRAGMA {pragma}")
    except BaseException as exc:
        db.close()
        if isinstance(exc, sqlite3.Error):
            raise JournalError(f"cannot open journal {path}: {exc}") from exc
        raise
    return db


def open_checkpointer(path: Path, synchronous: str) -> sqlite3.Connection:
    """The checkpointer's connection to a journal the writer has opened.

    With the writer's `synchronous`: SQLite syncs the WAL before a checkpoint
    copies it and the database file before the WAL may be reused only if the
    connection that checkpoints says so. Blocking; any thread may then use it,
    one at a time (`_sqlite_checkpoints.Checkpointer` hands it to its own thread).
    """
    db = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )
    try:
        db.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the journal to this code's schema version, all in one transaction."""
    migrations = MIGRATIONS
    db.execute("BEGIN IMMEDIATE")
    version = 0
    try:
        # Look again inside the transaction: another process may have created
        # or upgraded the file since `inspect`.
        version = _scalar(db, USER_VERSION)
        tables = [row[0] for row in db.execute(TABLES)]
        check_version(path, version, tables, migrate=True)
        for step in migrations[version:]:
            for statement in step:
                db.execute(statement)
        if version != len(migrations):
            db.execute(f"PRAGMA user_version = {len(migrations)}")
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise JournalError(
                f"migrating journal {path} from schema version {version} to "
                f"{len(migrations)} failed ({exc}); it was left at version {version}"
            ) from exc
        raise
    if version != len(migrations):
        logger.info(
            "migrated journal %s from schema version %d to %d",
            path,
            version,
            len(migrations),
        )


def _scalar(db: sqlite3.Connection, sql: str) -> Any:
    for row in db.execute(sql):
        return row[0]
    raise InternalError(f"{sql!r} returned no row; this is a bug, please report it")
