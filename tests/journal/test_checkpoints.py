"""The SQLite journal's checkpointer: the WAL copied off the commit path."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import coda.journal._sqlite_checkpoints as checkpoints_module
import coda.journal._sqlite_schema as schema
from coda.journal.events import RunSubmitted, TaskScheduled
from coda.journal.sqlite import SQLiteJournal

# The writer and the checkpointer log under it.
WRITER_LOG = "coda.journal"


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint rounds 20 ms apart, the WAL starting over past 50 frames."""
    monkeypatch.setattr(schema, "CHECKPOINT_PAUSES", (0.02, 0.02))
    monkeypatch.setattr(schema, "RESTART_FRAMES", 50)


async def append_runs(journal: SQLiteJournal, runs: int, first: int = 0) -> None:
    """One commit per run: its submission, then one commit per 5 events."""
    for r in range(first, first + runs):
        run_id = f"run-{r:05d}"
        await journal.append(
            [RunSubmitted(run_id=run_id, seq=0, at=1.0, workflow="w", args={"n": r})]
        )
        await journal.append(
            [
                TaskScheduled(
                    run_id=run_id,
                    seq=s,
                    at=2.0,
                    attempt=1,
                    step=s,
                    task="t",
                    args={"x": "x" * 200},
                )
                for s in range(1, 6)
            ]
        )


def wal_size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def events_in_database_file(path: Path, tmp: Path) -> int:
    """Events in the database file alone, as if its WAL were lost."""
    copy = tmp / "copy.db"
    shutil.copyfile(path, copy)
    with sqlite3.connect(copy) as db:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def checkpointer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "checkpointer" in t.name]


async def append_until_the_wal_starts_over(journal: SQLiteJournal, first: int) -> int:
    """Append runs until the checkpointer sees fewer frames than before."""
    assert journal._writer is not None
    checkpointer = journal._writer.checkpointer
    assert checkpointer is not None
    most, deadline = 0, time.monotonic() + 20
    while checkpointer.frames >= most or most < schema.RESTART_FRAMES:
        assert time.monotonic() < deadline, "the WAL never started over"
        most = max(most, checkpointer.frames)
        await append_runs(journal, 10, first=first)
        first += 10
    return first


def test_the_wal_is_copied_and_starts_over(tmp_path: Path, eager: None) -> None:
    path = tmp_path / "j.db"

    async def main() -> int:
        journal = await SQLiteJournal.open(path, synchronous="OFF")
        try:
            runs = 0
            for _ in range(3):
                runs = await append_until_the_wal_starts_over(journal, runs)
            await wait_for(lambda: events_in_database_file(path, tmp_path) > 0)
            return runs
        finally:
            await journal.close()

    runs = asyncio.run(main())
    assert events_in_database_file(path, tmp_path) == runs * 6


def test_close_leaves_no_wal_while_rounds_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "CHECKPOINT_PAUSES", (0.0, 0.0))
    monkeypatch.setattr(schema, "RESTART_FRAMES", 1)

    async def main() -> None:
        for n in range(5):
            journal = await SQLiteJournal.open(tmp_path / "j.db")
            await append_runs(journal, 20, first=20 * n)
            await journal.close()
            assert sorted(p.name for p in tmp_path.iterdir()) == ["j.db"]

    asyncio.run(main())


class FailingConnection:
    """A checkpointer's connection on a failing disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.tries = 0

    def execute(self, sql: str) -> Any:
        self.tries += 1
        raise sqlite3.OperationalError("disk I/O error")

    def close(self) -> None:
        self.db.close()


def test_a_failing_checkpoint_is_logged_once_and_appends_go_on(
    tmp_path: Path,
    eager: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    connections: list[FailingConnection] = []
    real = schema.open_checkpointer

    def failing(path: Path, synchronous: str) -> Any:
        connections.append(FailingConnection(real(path, synchronous)))
        return connections[-1]

    monkeypatch.setattr(schema, "open_checkpointer", failing)
    path = tmp_path / "j.db"

    async def main() -> int:
        async with await SQLiteJournal.open(path, synchronous="OFF") as journal:
            runs, deadline = 0, time.monotonic() + 20
            while connections[0].tries < 3:
                assert time.monotonic() < deadline, "no checkpoint was tried"
                await append_runs(journal, 10, first=runs)
                runs += 10
            assert await journal.run(f"run-{runs - 1:05d}") is not None
            return runs

    with caplog.at_level(logging.DEBUG, logger=WRITER_LOG):
        runs = asyncio.run(main())
    failures = [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR and "checkpoint" in r.msg
    ]
    assert len(failures) == 1
    assert "disk I/O error" in failures[0].getMessage()
    assert str(path) in failures[0].getMessage()
    # The writer, the last connection, still checkpointed on closing.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.db"]
    assert events_in_database_file(path, tmp_path) == runs * 6
    assert not checkpointer_threads()


def test_without_a_checkpointer_the_writer_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def cannot(path: Path, synchronous: str) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(schema, "open_checkpointer", cannot)

    async def main() -> None:
        async with await SQLiteJournal.open(tmp_path / "j.db") as journal:
            assert journal._writer is not None
            assert journal._writer.checkpointer is None
            autocheckpoint = await journal._writer.call(
                lambda db: db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
            )
            assert autocheckpoint == schema.WAL_AUTOCHECKPOINT
            await append_runs(journal, 5)

    with caplog.at_level(logging.WARNING, logger=WRITER_LOG):
        asyncio.run(main())
    assert "unable to open database file" in caplog.text


def test_the_writer_itself_does_not_checkpoint(tmp_path: Path) -> None:
    async def main() -> None:
        async with await SQLiteJournal.open(tmp_path / "j.db") as journal:
            assert journal._writer is not None
            autocheckpoint = await journal._writer.call(
                lambda db: db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
            )
            assert autocheckpoint == 0
            assert journal._writer.checkpointer is not None

    asyncio.run(main())


def test_readers_pinning_the_wal_are_waited_for_past_the_hard_limit(
    tmp_path: Path,
    eager: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(schema, "HARD_FRAMES", 200)
    monkeypatch.setattr(schema, "BUSY_TIMEOUT", 0.05)
    path = tmp_path / "j.db"

    async def main() -> int:
        async with await SQLiteJournal.open(path, synchronous="OFF") as journal:
            await append_runs(journal, 5)
            # A reader in the middle of a read holds its snapshot: no
            # checkpoint may copy past it, and the WAL cannot start over.
            reader = sqlite3.connect(path, isolation_level=None)
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM events").fetchone()
            await append_runs(journal, 100, first=5)
            pinned = wal_size(path)
            assert pinned > 200 * 4096
            reader.execute("COMMIT")
            reader.close()
            # Once the reader is gone, a RESTART checkpoint gets through.
            runs = await append_until_the_wal_starts_over(journal, 105)
            assert await journal.run(f"run-{runs - 1:05d}") is not None
            return runs

    with caplog.at_level(logging.WARNING, logger=WRITER_LOG):
        runs = asyncio.run(main())
    assert "readers holding old snapshots" in caplog.text
    assert events_in_database_file(path, tmp_path) == runs * 6


def test_a_read_only_journal_has_no_checkpointer(tmp_path: Path) -> None:
    path = tmp_path / "j.db"

    async def main() -> None:
        async with await SQLiteJournal.open(path) as journal:
            await append_runs(journal, 1)
        async with await SQLiteJournal.open(path, readonly=True) as journal:
            assert journal._writer is None
            assert not checkpointer_threads()

    asyncio.run(main())


def test_many_journals_leave_no_threads_behind(tmp_path: Path) -> None:
    before = set(threading.enumerate())

    async def main() -> None:
        for n in range(30):
            async with await SQLiteJournal.open(tmp_path / f"{n}.db") as journal:
                await append_runs(journal, 1)

    asyncio.run(main())
    time.sleep(0.1)  # the writers' executor threads end on their own
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not [t.name for t in left if t.name.startswith("coda-journal")]


def test_a_stop_just_before_the_checkpointer_clears_its_wake_up_still_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The thread waits for a commit, lets a pause go by, then clears the
    # commit signal. A `stop` landing in between sets that signal just before
    # it is cleared; the thread must still see it is closing, not wait for a
    # commit that never comes (a journal's close then hung for ever).
    closing = threading.Event()

    class StopFirst(threading.Event):
        def clear(self) -> None:
            closing.set()  # what `stop` does, in its order
            self.set()
            super().clear()

    # The checkpointer's two events, in the order it makes them; any other
    # (its thread's own) as usual.
    real, made = threading.Event, [StopFirst(), closing]
    monkeypatch.setattr(
        checkpoints_module.threading, "Event", lambda: made.pop(0) if made else real()
    )
    monkeypatch.setattr(schema, "CHECKPOINT_PAUSES", (0.01, 0.01))
    db = sqlite3.connect(tmp_path / "j.db", check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    checkpointer = checkpoints_module.Checkpointer(tmp_path / "j.db", db)
    checkpointer.committed()  # the thread wakes, pauses, then clears
    checkpointer._thread.join(timeout=5)
    assert not checkpointer._thread.is_alive()
