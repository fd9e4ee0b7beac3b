"""The SQLite journal: round trips, group commit, failures, projections, versions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import coda.journal._sqlite_schema as schema
import coda.journal._sqlite_writer as writer_module
import coda.journal.sqlite as sqlite_module
from coda.doctor import check_journal
from coda.errors import JournalError, JournalVersionError, RunNotFound
from coda.journal.codec import decode, encode
from coda.journal.events import (
    EVENT_TYPES,
    AttemptFailed,
    AttemptStarted,
    ErrorInfo,
    Event,
    RetryPolicy,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunParked,
    RunResumed,
    RunRetried,
    RunSubmitted,
    SideEffectRecorded,
    TaskCompleted,
    TaskFailed,
    TaskReused,
    TaskScheduled,
    TaskStarted,
)
from coda.journal.sqlite import SQLiteJournal, read_history_sync, read_runs_sync
from coda.state import fold

BOOM = ErrorInfo(type="ValueError", message="boom", types=("ValueError", "Exception"))


def run_async(path: Path, body: Callable[[SQLiteJournal], Awaitable[Any]]) -> Any:
    """Open the journal at `path`, run `body` with it, close it."""

    async def main() -> Any:
        journal = await SQLiteJournal.open(path)
        try:
            return await body(journal)
        finally:
            await journal.close()

    return asyncio.run(main())


def submitted(run_id: str, workflow: str = "wf", at: float = 100.0) -> RunSubmitted:
    return RunSubmitted(run_id=run_id, seq=0, at=at, workflow=workflow, args={"n": 1})


def step(cls: type[Event], run_id: str, seq: int, **fields: Any) -> Event:
    return cls(run_id=run_id, seq=seq, at=100.0 + seq, **fields)


def completed_run(run_id: str) -> list[Event]:
    """A short legal history that ends completed."""
    return [
        submitted(run_id),
        step(AttemptStarted, run_id, 1, attempt=1),
        step(RunCompleted, run_id, 2, attempt=1, result=run_id),
    ]


def task_steps(run_id: str, seq: int, index: int, key: Any, result: Any) -> list[Event]:
    """A task step of attempt 1 scheduled, started and completed, from `seq` on."""
    return [
        step(TaskScheduled, run_id, seq, attempt=1, step=index, task="t", args={},
             cache_key=key),
        step(TaskStarted, run_id, seq + 1, attempt=1, step=index, try_number=1),
        step(TaskCompleted, run_id, seq + 2, attempt=1, step=index, try_number=1,
             result=result, cache_key=key),
    ]  # fmt: skip


def every_event_type(r: str) -> list[Event]:
    """One event of each type, with non-default fields (not a legal history)."""
    policy = RetryPolicy(max_retries=3, retry_on=("OSError",), backoff=0.5)
    key = ["k", 1]
    # fmt: off
    return [
        step(RunSubmitted, r, 0, workflow="w", args={"a": [1, 2]}, policy=policy),
        step(AttemptStarted, r, 1, attempt=1),
        step(TaskScheduled, r, 2, attempt=1, step=0, task="t", args={"x": None},
             cache_key=key, policy=policy, timeout=9.5),
        step(TaskStarted, r, 3, attempt=1, step=0, try_number=1, worker="w1"),
        step(TaskFailed, r, 4, attempt=1, step=0, try_number=1, error=BOOM,
             retry_at=6.0),
        step(TaskCompleted, r, 5, attempt=1, step=0, try_number=2,
             result={"ok": True}, cache_key=key),
        step(SideEffectRecorded, r, 6, attempt=1, step=1, kind="uuid4", value="u"),
        step(AttemptFailed, r, 7, attempt=1, error=BOOM, retry_at=9.0),
        step(TaskReused, r, 8, attempt=2, step=0, task="t", cache_key=key,
             result={"ok": True}, from_attempt=1),
        step(RunParked, r, 9, attempt=2, error=BOOM),
        step(RunResumed, r, 10, reason="fixed"),
        step(RunFailed, r, 11, error=BOOM),
        step(RunRetried, r, 12, reason="again"),
        step(RunCancelled, r, 13, reason="enough"),
        step(RunCompleted, r, 14, attempt=3, result=[1, "two"]),
    ]
    # fmt: on


def ro_count(path: Path, run_id: str) -> int:
    """Events of a run as another connection sees them (committed ones only)."""
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return int(
            conn.execute(
                "SELECT count(*) FROM history WHERE run_id = ?", (run_id,)
            ).fetchone()[0]
        )
    finally:
        conn.close()


@pytest.fixture(params=["update-from", "one-by-one"])
def runs_updates(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Both ways the writer updates `runs` rows: many per statement (SQLite
    3.33 and later), or one `executemany` row at a time (older ones)."""
    if request.param == "one-by-one":
        monkeypatch.setattr(schema, "UPDATE_FROM", (99, 0, 0))
    return str(request.param)


# -- round trip -----------------------------------------------------------------


def test_every_event_type_round_trips(tmp_path: Path) -> None:
    events = every_event_type("r1")
    assert {type(e).__name__ for e in events} == set(EVENT_TYPES)

    async def body(journal: SQLiteJournal) -> list[Event]:
        await journal.append(events)
        return await journal.history("r1")

    assert run_async(tmp_path / "j.db", body) == events
    # And through the synchronous, read-only reader, by prefix.
    assert read_history_sync(tmp_path / "j.db", "r") == events


def test_history_of_unknown_run_is_empty(tmp_path: Path) -> None:
    async def body(journal: SQLiteJournal) -> list[Event]:
        await journal.append(completed_run("a"))
        return await journal.history("b")

    assert run_async(tmp_path / "j.db", body) == []


def test_appending_nothing_writes_nothing(tmp_path: Path) -> None:
    async def body(journal: SQLiteJournal) -> int:
        await journal.append([])
        return journal.commits

    assert run_async(tmp_path / "j.db", body) == 0


# -- group commit ---------------------------------------------------------------


def test_concurrent_appends_are_batched_and_released_after_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    runs, steps = 100, 10
    not_visible: list[tuple[str, int]] = []

    async def caller(journal: SQLiteJournal, run_id: str) -> None:
        await journal.append([submitted(run_id)])
        await journal.append([step(AttemptStarted, run_id, 1, attempt=1)])
        for seq in range(2, steps + 2):
            event = step(
                SideEffectRecorded,
                run_id,
                seq,
                attempt=1,
                step=seq - 2,
                kind="now",
                value=seq,
            )
            await journal.append([event])
            # Released only once committed: another connection must see it.
            if ro_count(path, run_id) != seq + 1:
                not_visible.append((run_id, seq))

    async def body(journal: SQLiteJournal) -> tuple[int, dict[str, list[Event]]]:
        await asyncio.gather(*(caller(journal, f"run-{i:03}") for i in range(runs)))
        return journal.commits, await journal.unfinished()

    commits, histories = run_async(path, body)
    assert not_visible == []
    calls = runs * (steps + 2)
    assert len(histories) == runs
    assert all(len(h) == steps + 2 for h in histories.values())
    assert all([e.seq for e in h] == list(range(steps + 2)) for h in histories.values())
    # Many calls shared each transaction.
    assert commits < calls / 5, (commits, calls)


def test_calls_queued_together_share_one_transaction(tmp_path: Path) -> None:
    async def body(journal: SQLiteJournal) -> tuple[int, int]:
        await journal.append([submitted("first")])
        before = journal.commits
        await asyncio.gather(*(journal.append([submitted(f"r{i}")]) for i in range(50)))
        return before, journal.commits

    before, after = run_async(tmp_path / "j.db", body)
    assert after - before == 1


def test_small_batches_are_written_by_the_loop_only_while_the_writer_is_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writing_threads: list[str] = []
    write = writer_module.Writer.write

    def recording_write(self: writer_module.Writer, batch: Any) -> None:
        writing_threads.append(threading.current_thread().name)
        write(self, batch)

    monkeypatch.setattr(writer_module.Writer, "write", recording_write)

    async def body(journal: SQLiteJournal) -> list[int]:
        assert journal._writer is not None
        await journal.append(completed_run("small"))  # 3 events: this thread
        large = [submitted(f"large-{i}") for i in range(sqlite_module.SMALL_BATCH + 1)]
        await journal.append(large)  # one more than SMALL_BATCH: the writer's
        # The writer's thread busy (as with a checkpoint of its own): a small
        # batch waits for it and goes there, never beside it.
        release = threading.Event()
        blocker = journal._writer.submit(lambda _: release.wait(10))
        waiting = asyncio.ensure_future(journal.append(completed_run("behind")))
        await asyncio.sleep(0.05)
        stuck = [ro_count(tmp_path / "j.db", "behind"), int(waiting.done())]
        release.set()
        await waiting
        assert blocker.result() is True
        return stuck

    stuck = run_async(tmp_path / "j.db", body)
    assert stuck == [0, 0]
    loop_thread = threading.main_thread().name
    assert writing_threads[0] == loop_thread
    assert writing_threads[1].startswith("coda-journal-writer")
    assert writing_threads[2].startswith("coda-journal-writer")
    assert len(writing_threads) == 3


def test_a_caller_that_stops_waiting_does_not_disturb_the_writer(
    tmp_path: Path,
) -> None:
    async def body(journal: SQLiteJournal) -> tuple[bool, int]:
        waiting = asyncio.ensure_future(journal.append(completed_run("gave-up")))
        await asyncio.sleep(0)  # queued, then the caller is cancelled
        waiting.cancel()
        await journal.append(completed_run("next"))
        # Its events were taken by the writer before it gave up: the history
        # says what happened.
        return waiting.cancelled(), len(await journal.history("gave-up"))

    assert run_async(tmp_path / "j.db", body) == (True, 3)


def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "j.db"

    async def main() -> None:
        journal = await SQLiteJournal.open(path)
        appends = [
            asyncio.ensure_future(journal.append(completed_run(f"r{i}")))
            for i in range(20)
        ]
        await asyncio.sleep(0)  # the appends are queued
        await journal.close()
        await asyncio.gather(*appends)
        with pytest.raises(JournalError, match="closed"):
            await journal.append(completed_run("late"))

    asyncio.run(main())
    assert len(read_runs_sync(path)) == 20


def _calls_from(plan: list[tuple[int, int, int, int]]) -> list[list[Event]]:
    """Calls to a few runs, mostly continuing each run, some out of place.

    Each `(run, length, shift, kind)` is a call of `length` events to run
    `run`, starting `shift` positions away from where the run would stand if
    every call so far had succeeded.
    """
    next_seq: dict[int, int] = {}
    calls = []
    for run, length, shift, kind in plan:
        run_id = f"r{run}"
        start = max(0, next_seq.get(run, 0) + shift)
        events: list[Event] = []
        for seq in range(start, start + length):
            if seq == 0:
                events.append(submitted(run_id))
            elif kind == 0:
                events.append(step(AttemptStarted, run_id, seq, attempt=seq))
            elif kind == 1:
                events.append(
                    step(
                        TaskCompleted,
                        run_id,
                        seq,
                        attempt=1,
                        step=seq,
                        try_number=1,
                        result=seq,
                        cache_key=["k", run],
                    )
                )
            else:
                events.append(step(SideEffectRecorded, run_id, seq, attempt=1,
                                   step=seq, kind="now", value=seq))  # fmt: skip
        calls.append(events)
        next_seq[run] = start + length
    return calls


@settings(max_examples=40, deadline=None)
@given(
    plan=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(1, 3),
            st.sampled_from([0, 0, 0, 0, 0, 0, -1, 1, -3]),
            st.integers(0, 2),
        ),
        min_size=1,
        max_size=40,
    ),
    turns=st.lists(st.integers(0, 2), min_size=40, max_size=40),
)
def test_concurrent_calls_end_as_if_made_one_after_another(
    plan: list[tuple[int, int, int, int]], turns: list[int]
) -> None:
    """Queued together, over a few turns of the event loop (some while a
    transaction is being written), calls succeed or fail exactly as they would
    one at a time in the same order, and leave the same histories and
    projections."""
    calls = _calls_from(plan)
    # Nondecreasing: a call is never made in an earlier turn than the one before.
    wait = [sum(turns[: i + 1]) for i in range(len(calls))]

    async def one_by_one(journal: SQLiteJournal) -> list[bool]:
        outcomes = []
        for call in calls:
            try:
                await journal.append(call)
                outcomes.append(True)
            except JournalError:
                outcomes.append(False)
        return outcomes

    async def together(journal: SQLiteJournal) -> list[bool]:
        async def make(call: list[Event], turns: int) -> bool:
            for _ in range(turns):
                await asyncio.sleep(0)
            try:
                await journal.append(call)
            except JournalError:
                return False
            return True

        return list(await asyncio.gather(*map(make, calls, wait)))

    def outcome(path: Path) -> tuple[Any, ...]:
        conn = sqlite3.connect(path)
        try:
            cache = conn.execute(
                "SELECT r.run_id, c.cache_key, c.result, c.attempt, c.step"
                " FROM task_cache c JOIN runs r USING (rk) ORDER BY 1, 2"
            ).fetchall()
            events = conn.execute(
                "SELECT run_id, seq, type, body FROM history ORDER BY id"
            ).fetchall()
        finally:
            conn.close()
        runs = sorted(read_runs_sync(path, limit=1000), key=lambda r: r.run_id)
        return cache, events, runs

    with tempfile.TemporaryDirectory() as tmp:
        alone = run_async(Path(tmp, "alone.db"), one_by_one)
        queued = run_async(Path(tmp, "queued.db"), together)
        assert queued == alone
        assert outcome(Path(tmp, "queued.db")) == outcome(Path(tmp, "alone.db"))


# -- failures -------------------------------------------------------------------


def test_duplicate_position_fails_only_its_call(tmp_path: Path) -> None:
    async def body(journal: SQLiteJournal) -> tuple[list[Any], int, int]:
        await journal.append(completed_run("taken"))
        before = journal.commits
        bad = [step(RunRetried, "taken", 2, reason="dup")]
        calls = [completed_run(f"good-{i}") for i in range(40)]
        calls.insert(17, bad)
        outcomes = await asyncio.gather(
            *(journal.append(c) for c in calls), return_exceptions=True
        )
        # Still usable afterwards.
        await journal.append([step(RunRetried, "taken", 3, reason="ok")])
        return outcomes, journal.commits - before, len(await journal.history("taken"))

    outcomes, commits, taken_events = run_async(tmp_path / "j.db", body)
    error = outcomes.pop(17)
    assert isinstance(error, JournalError)
    assert "#2 of run taken is already taken" in str(error)
    assert "nothing of this append was written" in str(error)
    assert outcomes == [None] * 40
    # The good calls committed in a few transactions, not one each.
    assert commits < 15
    assert taken_events == 4
    runs = read_runs_sync(tmp_path / "j.db", limit=1000)
    assert len(runs) == 41
    assert all(r.status == "completed" for r in runs if r.run_id != "taken")


def test_a_call_is_all_or_nothing(tmp_path: Path) -> None:
    async def body(journal: SQLiteJournal) -> tuple[list[Event], Any]:
        await journal.append([submitted("r")])
        # The second event repeats the position of the first.
        with pytest.raises(JournalError, match="repeats a position of its own"):
            await journal.append(
                [
                    step(AttemptStarted, "r", 1, attempt=1),
                    step(RunFailed, "r", 1, error=BOOM),
                ]
            )
        return await journal.history("r"), await journal.run("r")

    history, summary = run_async(tmp_path / "j.db", body)
    assert [type(e) for e in history] == [RunSubmitted]
    assert (summary.status, summary.attempt, summary.events) == ("pending", 0, 1)


def test_unknown_run_and_double_submission_are_refused(tmp_path: Path) -> None:
    async def body(journal: SQLiteJournal) -> None:
        await journal.append([submitted("known")])
        with pytest.raises(JournalError, match="no RunSubmitted for run ghost"):
            await journal.append([step(AttemptStarted, "ghost", 1, attempt=1)])
        with pytest.raises(JournalError, match="submitted already"):
            await journal.append(
                [RunSubmitted(run_id="known", seq=5, at=1.0, workflow="w", args={})]
            )
        assert await journal.run("ghost") is None
        assert (await journal.run("known")).events == 1  # type: ignore[union-attr]

    run_async(tmp_path / "j.db", body)


def test_a_submission_after_other_events_of_the_run_waits_for_the_next_batch(
    tmp_path: Path,
) -> None:
    # Sequentially, the first call fails (the run does not exist yet) and the
    # second succeeds; queued together they must behave the same.
    async def body(journal: SQLiteJournal) -> tuple[Any, ...]:
        return await asyncio.gather(
            journal.append([step(AttemptStarted, "late", 1, attempt=1)]),
            journal.append([submitted("late")]),
            return_exceptions=True,
        )

    first, second = run_async(tmp_path / "j.db", body)
    assert isinstance(first, JournalError)
    assert second is None


def test_bad_event_fields_are_refused_before_queueing(tmp_path: Path) -> None:
    async def body(journal: SQLiteJournal) -> None:
        with pytest.raises(JournalError, match="non-empty str"):
            await journal.append([submitted("")])
        with pytest.raises(JournalError, match="cannot be encoded"):
            await journal.append(
                [
                    RunSubmitted(
                        run_id="r", seq=0, at=1.0, workflow="w", args={"x": object()}
                    )
                ]
            )
        assert journal.commits == 0

    run_async(tmp_path / "j.db", body)


def test_disk_full_fails_with_a_clear_error_and_keeps_the_journal(
    tmp_path: Path,
) -> None:
    async def body(journal: SQLiteJournal) -> None:
        await journal.append(completed_run("before"))
        writer = journal._writer  # the only way to make SQLite report SQLITE_FULL
        assert writer is not None
        (pages,) = await writer.call(
            lambda db: db.execute("PRAGMA page_count").fetchone()
        )
        await writer.call(lambda db: db.execute(f"PRAGMA max_page_count = {pages + 2}"))

        big: list[Event] = [submitted("big")]
        big += [
            step(
                SideEffectRecorded,
                "big",
                i,
                attempt=1,
                step=i,
                kind="random",
                value="x" * 2000,
            )
            for i in range(1, 200)
        ]
        small = [step(RunRetried, "before", 3, reason="fits")]
        big_outcome, small_outcome = await asyncio.gather(
            journal.append(big), journal.append(small), return_exceptions=True
        )
        assert isinstance(big_outcome, JournalError)
        message = str(big_outcome)
        assert "disk is full" in message
        assert f"free space on {journal.path.parent}" in message
        assert "nothing of this append was written" in message
        assert small_outcome is None  # a smaller call still fitted

        assert await journal.history("big") == []
        assert await journal.run("big") is None
        assert len(await journal.history("before")) == 4
        assert await journal.integrity_problems() == []

        await writer.call(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
        await journal.append(big)
        assert len(await journal.history("big")) == 200

    run_async(tmp_path / "j.db", body)


def test_a_lock_held_elsewhere_fails_the_batch_at_once_and_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.db"
    monkeypatch.setattr(schema, "BUSY_TIMEOUT", 0.2)

    async def body(journal: SQLiteJournal) -> None:
        await journal.append([submitted("r")])
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(journal.append(completed_run(f"x{i}")) for i in range(8)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        other.execute("ROLLBACK")
        other.close()
        for outcome in outcomes:
            assert isinstance(outcome, JournalError)
            assert "locked by another process" in str(outcome)
            assert "another supervisor" in str(outcome)
        # One wait for the lock, not one per call or per half of the batch.
        assert elapsed < 1.0, elapsed
        await journal.append(completed_run("after"))
        assert len(await journal.history("after")) == 3

    run_async(path, body)


# -- run keys -------------------------------------------------------------------


def keys_of(journal: SQLiteJournal) -> dict[str, int]:
    assert journal._writer is not None
    return journal._writer.keys


def test_runs_written_by_an_earlier_journal_are_found_by_key(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    run_async(path, lambda j: j.append([*completed_run("a")[:2], submitted("b")]))

    async def body(journal: SQLiteJournal) -> dict[str, int]:
        assert keys_of(journal) == {}
        await journal.append([step(RunCancelled, "b", 1)])
        await journal.append([step(RunCompleted, "a", 2, attempt=1, result=1)])
        return dict(keys_of(journal))

    assert run_async(path, body) == {}  # both finished: forgotten again
    assert [r.status for r in read_runs_sync(path)] == ["cancelled", "completed"]
    assert read_history_sync(path, "a") == [
        *completed_run("a")[:2],
        step(RunCompleted, "a", 2, attempt=1, result=1),
    ]
    conn = sqlite3.connect(path)
    rks = dict(conn.execute("SELECT run_id, rk FROM runs"))
    assert conn.execute("SELECT rk, seq FROM events ORDER BY id").fetchall() == [
        (rks["a"], 0), (rks["a"], 1), (rks["b"], 0), (rks["b"], 1), (rks["a"], 2)
    ]  # fmt: skip
    conn.close()


def test_a_finished_run_is_forgotten_and_found_again_when_reopened(
    tmp_path: Path,
) -> None:
    async def body(journal: SQLiteJournal) -> None:
        await journal.append(failing_history("r")[:2])
        assert "r" in keys_of(journal)
        await journal.append([step(RunFailed, "r", 2, error=BOOM)])
        assert "r" not in keys_of(journal)
        await journal.append([step(RunRetried, "r", 3, reason="again")])
        assert "r" in keys_of(journal)
        summary = await journal.run("r")
        assert summary is not None
        assert (summary.status, summary.events) == ("pending", 4)

    run_async(tmp_path / "j.db", body)


def test_the_run_keys_stay_few(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "KEYS_MAX", 10)

    async def body(journal: SQLiteJournal) -> None:
        for i in range(40):
            await journal.append([submitted(f"r{i:02}")])
            assert len(keys_of(journal)) <= 10
        # Forgotten runs are looked up again.
        await journal.append([step(AttemptStarted, "r00", 1, attempt=1)])
        await journal.append([step(AttemptStarted, "r01", 1, attempt=1)])
        assert [len(await journal.history(f"r{i:02}")) for i in range(3)] == [2, 2, 1]

    run_async(tmp_path / "j.db", body)


def test_an_append_by_another_writer_is_seen_before_refusing(tmp_path: Path) -> None:
    """The writer remembers where each run's history ends; when another writer
    (another journal on the same file) moved that end, the append that
    continues the history is still accepted, and one that does not is not."""
    path = tmp_path / "j.db"
    history = failing_history("r")

    async def main() -> list[Event]:
        first = await SQLiteJournal.open(path)
        second = await SQLiteJournal.open(path)
        try:
            await first.append(history[:2])
            await second.append(history[2:4])  # `first` still thinks: ends at #2
            await first.append(history[4:6])
            with pytest.raises(JournalError, match="ends at #5"):
                await first.append(history[7:8])
            await second.append(history[6:8])
            return await first.history("r")
        finally:
            await first.close()
            await second.close()

    assert asyncio.run(main()) == history[:8]


def test_a_rolled_back_submission_leaves_no_key_behind(tmp_path: Path) -> None:
    """The key a run got in a transaction that failed may be given to another
    run next; an append to the first must then be refused, never written
    under the other's key."""

    async def body(journal: SQLiteJournal) -> None:
        await journal.append(completed_run("before"))
        writer = journal._writer
        assert writer is not None
        (pages,) = await writer.call(
            lambda db: db.execute("PRAGMA page_count").fetchone()
        )
        await writer.call(lambda db: db.execute(f"PRAGMA max_page_count = {pages + 2}"))
        big: list[Event] = [submitted("lost")] + [
            step(SideEffectRecorded, "lost", i, attempt=1, step=i, kind="random",
                 value="x" * 2000)
            for i in range(1, 200)
        ]  # fmt: skip
        with pytest.raises(JournalError, match="disk is full"):
            await journal.append(big)
        assert "lost" not in keys_of(journal)
        await writer.call(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))

        await journal.append([submitted("next")])  # may get the key "lost" had
        with pytest.raises(JournalError, match="no RunSubmitted for run lost"):
            await journal.append([step(AttemptStarted, "lost", 1, attempt=1)])
        assert await journal.history("next") == [submitted("next")]
        assert await journal.integrity_problems() == []

    run_async(tmp_path / "j.db", body)


def test_a_new_run_in_a_batch_retried_in_halves_is_written_once(
    tmp_path: Path,
) -> None:
    async def body(journal: SQLiteJournal) -> list[Any]:
        await journal.append([submitted("old")])
        outcomes = await asyncio.gather(
            journal.append(completed_run("new")[:2]),
            journal.append([step(RunCancelled, "old", 5)]),  # a gap: refused
            return_exceptions=True,
        )
        await journal.append([step(RunCompleted, "new", 2, attempt=1, result=1)])
        assert await journal.integrity_problems() == []
        return list(outcomes)

    outcomes = run_async(tmp_path / "j.db", body)
    assert outcomes[0] is None and isinstance(outcomes[1], JournalError)
    history = read_history_sync(tmp_path / "j.db", "new")
    assert [e.seq for e in history] == [0, 1, 2]


# -- projections ----------------------------------------------------------------


def test_projection_follows_a_completed_run(tmp_path: Path) -> None:
    key = ["fetch", {"url": "u"}]
    history: list[Event] = [
        submitted("r", workflow="orders", at=50.0),
        step(AttemptStarted, "r", 1, attempt=1),
        *task_steps("r", 2, 0, key, {"body": "hi"}),
        step(RunCompleted, "r", 5, attempt=1, result={"total": 3}),
    ]
    running = ("running", 1)
    expected = [("pending", 0), running, running, running, running, ("completed", 1)]

    async def body(journal: SQLiteJournal) -> None:
        for index, event in enumerate(history):
            await journal.append([event])
            summary = await journal.run("r")
            assert summary is not None
            assert (summary.status, summary.attempt) == expected[index]
            assert summary.events == index + 1
            assert summary.updated_at == event.at
            assert summary.submitted_at == 50.0
            assert summary.workflow == "orders"
            state = fold(history[: index + 1])
            assert state is not None and state.status.value == summary.status
            if index < 4:
                with pytest.raises(KeyError):
                    await journal.cached_result("r", key)
        assert await journal.cached_result("r", key) == {"body": "hi"}
        with pytest.raises(KeyError):
            await journal.cached_result("r", ["other"])
        summary = await journal.run("r")
        assert summary is not None
        assert summary.result == {"total": 3}
        assert summary.error is None

    run_async(tmp_path / "j.db", body)


def failing_history(run_id: str) -> list[Event]:
    return [
        submitted(run_id),
        step(AttemptStarted, run_id, 1, attempt=1),
        step(AttemptFailed, run_id, 2, attempt=1, error=BOOM, retry_at=200.0),
        step(AttemptStarted, run_id, 3, attempt=2),
        step(RunParked, run_id, 4, attempt=2, error=BOOM),
        step(RunResumed, run_id, 5, reason="fixed"),
        step(AttemptFailed, run_id, 6, attempt=2, error=BOOM),
        step(RunFailed, run_id, 7, error=BOOM),
        step(RunRetried, run_id, 8, reason="again"),
        step(AttemptStarted, run_id, 9, attempt=3),
        step(RunCancelled, run_id, 10, reason="stop"),
    ]


def test_projection_follows_failures_parking_and_retries(
    tmp_path: Path, runs_updates: str
) -> None:
    history = failing_history("r")
    # fmt: off
    expected = [
        ("pending", 0, False), ("running", 1, False), ("retrying", 1, True),
        ("running", 2, True), ("parked", 2, True), ("running", 2, False),
        ("running", 2, True), ("failed", 2, True), ("pending", 2, False),
        ("running", 3, False), ("cancelled", 3, False),
    ]
    # fmt: on

    async def body(journal: SQLiteJournal) -> None:
        for index, event in enumerate(history):
            await journal.append([event])
            summary = await journal.run("r")
            assert summary is not None
            status, attempt, has_error = expected[index]
            assert (summary.status, summary.attempt) == (status, attempt), index
            assert (summary.error == BOOM) is has_error, index
            state = fold(history[: index + 1])
            assert state is not None
            assert (state.status.value, state.attempt) == (status, attempt)

    run_async(tmp_path / "j.db", body)


def test_projection_is_the_same_when_events_share_a_batch(
    tmp_path: Path, runs_updates: str
) -> None:
    # One call per event, all queued at once: they land in one transaction and
    # the projection must add up as if they had been appended one by one.
    history = failing_history("r")
    key = ["k"]
    cached = [
        submitted("c"),
        step(AttemptStarted, "c", 1, attempt=1),
        *task_steps("c", 2, 0, key, 1),
        *task_steps("c", 5, 1, key, 2),
    ]

    async def body(journal: SQLiteJournal) -> tuple[Any, Any, Any, int]:
        await asyncio.gather(*(journal.append([e]) for e in history + cached))
        return (
            await journal.run("r"),
            await journal.run("c"),
            await journal.cached_result("c", key),
            journal.commits,
        )

    r, c, cached_result, commits = run_async(tmp_path / "j.db", body)
    assert commits == 1
    assert (r.status, r.attempt, r.events, r.error) == ("cancelled", 3, 11, None)
    assert r.updated_at == history[-1].at
    assert (c.status, c.events) == ("running", 8)
    assert cached_result == 2  # the latest completion wins


def test_runs_lists_newest_first_with_filters(tmp_path: Path) -> None:
    async def body(journal: SQLiteJournal) -> None:
        for i in range(6):
            workflow = "even" if i % 2 == 0 else "odd"
            events: list[Event] = [submitted(f"r{i}", workflow=workflow, at=10.0 + i)]
            if i < 3:
                events.append(step(AttemptStarted, f"r{i}", 1, attempt=1))
            await journal.append(events)
        assert [r.run_id for r in await journal.runs()] == [
            "r5",
            "r4",
            "r3",
            "r2",
            "r1",
            "r0",
        ]
        assert [r.run_id for r in await journal.runs(limit=2)] == ["r5", "r4"]
        assert [r.run_id for r in await journal.runs(status="running")] == [
            "r2",
            "r1",
            "r0",
        ]
        assert [r.run_id for r in await journal.runs(workflow="odd")] == [
            "r5",
            "r3",
            "r1",
        ]
        assert [
            r.run_id for r in await journal.runs(status="pending", workflow="even")
        ] == ["r4"]

    run_async(tmp_path / "j.db", body)


def test_unfinished_returns_whole_histories_of_active_runs(tmp_path: Path) -> None:
    async def body(journal: SQLiteJournal) -> dict[str, list[Event]]:
        await journal.append(completed_run("done"))
        await journal.append(failing_history("cancelled"))
        await journal.append(failing_history("parked")[:5])
        await journal.append(completed_run("running")[:2])
        await journal.append([submitted("pending")])
        return await journal.unfinished()

    histories = run_async(tmp_path / "j.db", body)
    assert sorted(histories) == ["parked", "pending", "running"]
    assert histories["parked"] == failing_history("parked")[:5]
    assert histories["running"] == completed_run("running")[:2]


def test_a_run_with_an_unreadable_event_is_left_out_of_recovery_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As an older Coda wrote a policy of max_backoff=inf: JSON null, which no
    # reader accepts as a number. Every other run must still be recovered.
    path = tmp_path / "j.db"
    run_async(path, lambda j: j.append(completed_run("damaged")[:2]))
    run_async(path, lambda j: j.append(completed_run("fine")[:2]))
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "UPDATE events SET body = CAST(replace(CAST(body AS TEXT),"
            " '\"backoff\":1.0', '\"backoff\":null') AS BLOB)"
            " WHERE seq = 0 AND rk = (SELECT rk FROM runs WHERE run_id = 'damaged')"
        )
    with caplog.at_level(logging.ERROR, logger="coda.journal.sqlite"):
        histories = run_async(path, lambda j: j.unfinished())
    assert sorted(histories) == ["fine"]
    assert histories["fine"] == completed_run("fine")[:2]
    (record,) = caplog.records
    assert "run damaged cannot be recovered: its event #0 cannot be read" in (
        record.getMessage()
    )
    # Left as it was, for `coda doctor` and `coda history` to show.
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
    assert count == 4


def test_unfinished_reads_only_unfinished_runs_through_indexes(tmp_path: Path) -> None:
    run_async(tmp_path / "j.db", lambda j: j.append(completed_run("x")))
    conn = sqlite3.connect(tmp_path / "j.db")
    conn.execute("ANALYZE")  # as a big journal would look to the planner
    plan = conn.execute(
        "EXPLAIN QUERY PLAN " + schema.UNFINISHED_HISTORIES,
        schema.UNFINISHED,
    ).fetchall()
    conn.close()
    details = [row[-1] for row in plan]
    assert any("runs_by_status" in d for d in details), details
    assert any("events_by_run" in d for d in details), details
    assert not any(d.startswith("SCAN") for d in details), details
    assert not any("TEMP B-TREE" in d for d in details), details


# -- reading ---------------------------------------------------------------------


def test_resolve_by_id_and_prefix(tmp_path: Path) -> None:
    async def body(journal: SQLiteJournal) -> None:
        for run_id in ("abc123", "abc124", "abd999", "abc12"):
            await journal.append([submitted(run_id)])
        assert await journal.resolve("abd999") == "abd999"
        assert await journal.resolve("abd") == "abd999"
        assert await journal.resolve("abc123") == "abc123"
        # An exact id wins even when it is also a prefix of other ids.
        assert await journal.resolve("abc12") == "abc12"
        with pytest.raises(RunNotFound, match="ambiguous") as info:
            await journal.resolve("abc")
        assert "abc123" in str(info.value) and "abc124" in str(info.value)
        with pytest.raises(RunNotFound, match="no run with id or id prefix 'zz'"):
            await journal.resolve("zz")
        with pytest.raises(RunNotFound):
            await journal.resolve("")

    run_async(tmp_path / "j.db", body)


# Reads the journal read-only in a loop until told to stop; prints its counts.
READER_PROCESS = """
import sqlite3, sys
uri, counts = sys.argv[1], []
while sys.stdin.readline().strip() == "read":
    conn = sqlite3.connect(uri, uri=True)
    counts.append(conn.execute("SELECT count(*) FROM history").fetchone()[0])
    conn.close()
    print(counts[-1], flush=True)
"""


def test_readers_in_other_connections_never_see_locks(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    errors: list[BaseException] = []
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(len(read_history_sync(path, "busy")))
                seen.append(len(read_runs_sync(path, limit=5)))
            except BaseException as exc:  # collected for the assert
                errors.append(exc)
                return

    async def body(journal: SQLiteJournal) -> list[int]:
        await journal.append([submitted("busy")])
        uri = path.absolute().as_uri() + "?mode=ro"
        process = subprocess.Popen(
            [sys.executable, "-c", READER_PROCESS, uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdin is not None and process.stdout is not None
        threads = [threading.Thread(target=reader) for _ in range(2)]
        for thread in threads:
            thread.start()
        counts = []
        try:
            for seq in range(1, 120):
                event = step(SideEffectRecorded, "busy", seq, attempt=1, step=seq,
                             kind="now", value=seq)  # fmt: skip
                others = [journal.append([submitted(f"o-{seq}-{i}")]) for i in range(3)]
                await asyncio.gather(journal.append([event]), *others)
                # Another process reads between (and during) commits.
                process.stdin.write("read\n")
                process.stdin.flush()
                counts.append(int(process.stdout.readline()))
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            _, stderr = process.communicate("stop\n", timeout=10)
        assert process.returncode == 0, stderr
        return counts

    counts = run_async(path, body)
    assert errors == []
    assert len(seen) > 20
    assert max(seen) > 1  # the reader threads did see the history grow
    assert counts == sorted(counts) and counts[-1] == 120 + 119 * 3


def test_readonly_journal_reads_but_refuses_appends(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    run_async(path, lambda j: j.append(completed_run("r")))
    before = path.read_bytes()

    async def main() -> None:
        journal = await SQLiteJournal.open(path, readonly=True)
        try:
            assert len(await journal.history("r")) == 3
            with pytest.raises(JournalError, match="read-only"):
                await journal.append([submitted("x")])
        finally:
            await journal.close()

    asyncio.run(main())
    assert path.read_bytes() == before


def test_synchronous_mode_is_applied_and_checked(tmp_path: Path) -> None:
    async def main() -> None:
        for mode, value in (("FULL", 2), ("normal", 1), ("OFF", 0)):
            journal = await SQLiteJournal.open(tmp_path / "j.db", synchronous=mode)
            writer = journal._writer
            assert writer is not None
            row = await writer.call(
                lambda db: db.execute("PRAGMA synchronous").fetchone()
            )
            assert row[0] == value
            row = await writer.call(
                lambda db: db.execute("PRAGMA journal_mode").fetchone()
            )
            assert row[0] == "wal"
            await journal.close()
        with pytest.raises(ValueError, match="synchronous"):
            await SQLiteJournal.open(tmp_path / "j.db", synchronous="SOMETIMES")

    asyncio.run(main())


# -- versions and foreign files -------------------------------------------------


def test_a_newer_journal_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    run_async(path, lambda j: j.append(completed_run("r")))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = path.read_bytes()
    files = sorted(tmp_path.iterdir())

    async def main() -> None:
        for readonly in (False, True):
            with pytest.raises(JournalVersionError) as info:
                await SQLiteJournal.open(path, readonly=readonly)
            message = str(info.value)
            assert "schema version 99" in message
            assert f"version {len(schema.MIGRATIONS)} this Coda" in message
            assert "upgrade Coda" in message

    asyncio.run(main())
    with pytest.raises(JournalVersionError):
        read_history_sync(path, "r")
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == files  # not even a -wal or -shm file


def test_a_newer_version_not_yet_checkpointed_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    run_async(path, lambda j: j.append(completed_run("r")))
    newer = sqlite3.connect(path, isolation_level=None)  # a newer Coda, still open
    newer.execute("PRAGMA wal_autocheckpoint = 0")
    newer.execute("PRAGMA user_version = 7")  # in the WAL, not in the header yet
    before = path.read_bytes()
    try:
        assert int.from_bytes(before[60:64], "big") == len(schema.MIGRATIONS)
        with pytest.raises(JournalVersionError, match="schema version 7"):
            asyncio.run(SQLiteJournal.open(path))
        with pytest.raises(JournalVersionError, match="schema version 7"):
            read_runs_sync(path)
        assert path.read_bytes() == before
    finally:
        newer.close()


def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are my notes, not a journal\n" * 200)
    before = path.read_bytes()
    with pytest.raises(JournalError, match="not a SQLite database"):
        asyncio.run(SQLiteJournal.open(path))
    with pytest.raises(JournalError, match="not a SQLite database"):
        read_runs_sync(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_another_applications_database_is_refused_and_left_untouched(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(JournalError, match=r"not a Coda journal.*users"):
        asyncio.run(SQLiteJournal.open(path))
    assert path.read_bytes() == before


def test_missing_journal_is_refused_when_reading(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="does not exist"):
        asyncio.run(SQLiteJournal.open(tmp_path / "nope.db", readonly=True))
    with pytest.raises(JournalError, match="does not exist"):
        read_history_sync(tmp_path / "nope.db", "r")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_file_is_migrated_to_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    path.touch()
    events = completed_run("r")

    async def body(journal: SQLiteJournal) -> list[Event]:
        await journal.append(events)
        return await journal.history("r")

    assert run_async(path, body) == events
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)
    conn.close()


def test_an_older_journal_is_migrated_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.db"
    run_async(path, lambda j: j.append(completed_run("old")))
    current = len(schema.MIGRATIONS)

    # A later version whose second statement fails: nothing of it may remain.
    broken = (
        "CREATE TABLE notes (run_id TEXT)",
        "ALTER TABLE no_such_table ADD COLUMN x",
    )
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, broken))
    with pytest.raises(JournalError, match=f"left at version {current}"):
        asyncio.run(SQLiteJournal.open(path))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == current
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "notes" not in tables
    conn.close()

    # Reading an older journal that this code cannot read as it is, without
    # migrating it, is refused with advice.
    monkeypatch.setattr(schema, "READABLE_FROM", current + 1)
    with pytest.raises(JournalError, match="open it read-write once"):
        read_history_sync(path, "old")

    working = (
        "CREATE TABLE notes (run_id TEXT)",
        "INSERT INTO notes SELECT run_id FROM runs",
    )
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS[:current], working))
    assert run_async(path, lambda j: j.history("old")) == completed_run("old")
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == current + 1
    assert conn.execute("SELECT run_id FROM notes").fetchall() == [("old",)]
    conn.close()


def _version_1_journal(path: Path, histories: dict[str, list[Event]]) -> None:
    """A journal as Coda wrote it at schema version 1, with `runs` counting
    each run's events and keeping the time of its last one."""
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in schema.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    for run_id, history in histories.items():
        state = fold(history)
        assert state is not None
        conn.execute(
            "INSERT INTO runs (run_id, workflow, status, attempt, submitted_at,"
            " updated_at, events, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                state.workflow,
                state.status.value,
                state.attempt,
                history[0].at,
                history[-1].at,
                len(history),
                None if state.result is None else orjson.dumps(state.result).decode(),
            ),
        )
        conn.executemany(
            "INSERT INTO events (rk, seq, at, type, body) SELECT rk, ?, ?, ?, ?"
            " FROM runs WHERE run_id = ?",
            [(e.seq, e.at, type(e).__name__, encode(e), run_id) for e in history],
        )
    # A run once had key 7 and is gone: no later run may get a key up to 7.
    conn.execute("UPDATE sqlite_sequence SET seq = 7 WHERE name = 'runs'")
    conn.close()


def test_a_version_1_journal_is_migrated_and_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    done, going = completed_run("done"), completed_run("going")[:2]
    _version_1_journal(path, {"done": done, "going": going})

    # Read as it is, without a migration (a backup on a read-only mount, say).
    unmigrated = {r.run_id: r for r in read_runs_sync(path)}
    assert (unmigrated["done"].events, unmigrated["done"].result) == (3, "done")
    assert unmigrated["going"].updated_at == going[-1].at
    assert read_history_sync(path, "going") == going
    assert asyncio.run(check_journal(path)) == []
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1

    async def body(journal: SQLiteJournal) -> tuple[Any, ...]:
        before = await journal.run("done"), await journal.run("going")
        await journal.append([step(RunCompleted, "going", 2, attempt=1, result=5)])
        with pytest.raises(JournalError, match="ends at #2"):
            await journal.append([step(RunCancelled, "going", 4)])
        await journal.append(completed_run("new"))
        return (
            *before,
            await journal.run("going"),
            await journal.history("done"),
            await journal.history("going"),
            await journal.integrity_problems(),
        )

    done_summary, going_before, going_after, done_history, going_history, problems = (
        run_async(path, body)
    )
    assert (done_summary.status, done_summary.events) == ("completed", 3)
    assert done_summary.result == "done"
    assert done_summary.updated_at == done[-1].at
    assert (going_before.status, going_before.events) == ("running", 2)
    assert going_before.updated_at == going[-1].at
    assert (going_after.status, going_after.events, going_after.result) == (
        "completed",
        3,
        5,
    )
    assert done_history == done
    completion = step(RunCompleted, "going", 2, attempt=1, result=5)
    assert going_history == [*going, completion]
    assert problems == []

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(runs)")]
    assert "events" not in columns and "updated_at" not in columns
    keys = dict(conn.execute("SELECT run_id, rk FROM runs"))
    assert keys["done"] < keys["going"] < 8 <= keys["new"]
    assert conn.execute(
        "SELECT seq FROM history WHERE run_id = 'going' ORDER BY seq"
    ).fetchall() == [(0,), (1,), (2,)]
    conn.close()


# -- integrity ------------------------------------------------------------------


def test_integrity_problems_finds_gaps_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    run_async(path, lambda j: j.append(completed_run("a") + completed_run("b")))
    assert run_async(path, lambda j: j.integrity_problems()) == []

    conn = sqlite3.connect(path)
    conn.execute(
        "DELETE FROM events WHERE seq = 1 AND rk = (SELECT rk FROM runs"
        " WHERE run_id = 'b')"
    )
    conn.execute(
        "INSERT INTO events (rk, seq, at, type, body) VALUES (99, 0, 1, 'x', x'')"
    )
    conn.commit()
    conn.close()
    before = path.read_bytes()

    async def main() -> list[str]:
        journal = await SQLiteJournal.open(path, readonly=True)
        try:
            return await journal.integrity_problems()
        finally:
            await journal.close()

    problems = asyncio.run(main())
    assert path.read_bytes() == before
    assert any("run b" in p and "#0..#2" in p and "without gaps" in p for p in problems)
    assert any("names a run missing from runs" in p for p in problems)
    assert not any("run a" in p for p in problems)
    assert len(problems) == 2


def test_stored_body_is_the_codec_json(tmp_path: Path) -> None:
    events = completed_run("r")
    run_async(tmp_path / "j.db", lambda j: j.append(events))
    conn = sqlite3.connect(tmp_path / "j.db")
    rows = conn.execute(
        "SELECT seq, type, body FROM history WHERE run_id = 'r' ORDER BY seq"
    ).fetchall()
    conn.close()
    assert [(seq, kind) for seq, kind, _ in rows] == [
        (e.seq, type(e).__name__) for e in events
    ]
    assert [decode(body) for _, _, body in rows] == events
    # Stored as the bytes `encode` makes, whatever form they took on the way.
    conn = sqlite3.connect(tmp_path / "j.db")
    stored = conn.execute("SELECT typeof(body), body FROM events ORDER BY id")
    assert stored.fetchall() == [("blob", encode(e)) for e in events]
    conn.close()


def test_no_append_can_leave_a_gap_in_a_history(
    tmp_path: Path, runs_updates: str
) -> None:
    """An append must continue its run exactly where the history stands: a call
    that would skip a position is refused, alone or merged with good calls, so a
    failed append can never leave a later one stranded after a hole."""

    async def body(journal: SQLiteJournal) -> tuple[list[Any], list[int]]:
        await journal.append([submitted("r")])
        outcomes = await asyncio.gather(
            journal.append([step(AttemptStarted, "r", 1, attempt=1)]),
            journal.append([step(RunCancelled, "r", 3)]),  # skips #2
            return_exceptions=True,
        )
        with pytest.raises(JournalError, match="leaves a gap"):
            await journal.append([step(RunCancelled, "r", 2), step(RunRetried, "r", 4)])
        return list(outcomes), [e.seq for e in await journal.history("r")]

    outcomes, seqs = run_async(tmp_path / "j.db", body)
    assert outcomes[0] is None
    assert isinstance(outcomes[1], JournalError)
    assert "ends at #1: an append must continue it at #2" in str(outcomes[1])
    assert "starts at #3 (it would leave a gap)" in str(outcomes[1])
    assert seqs == [0, 1]


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=0, max_value=700),
    max_variables=st.sampled_from([3, 20, 999, 32766]),
)
def test_many_rows_are_written_in_order(count: int, max_variables: int) -> None:
    inserts = writer_module.ManyRows(
        ("INSERT INTO t (a, b) VALUES ", "(?, ?)", ""), max_variables
    )
    # The largest statement stays within SQLite's limit on variables.
    assert all(n * 2 <= max_variables or n == 1 for n in inserts.sql)
    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER, b TEXT)")
        rows = [(i, f"row {i}") for i in range(count)]
        inserts.run(db, rows)
        assert db.execute("SELECT a, b FROM t ORDER BY id").fetchall() == rows
    finally:
        db.close()


def test_a_later_completion_in_the_same_batch_wins_the_cache(tmp_path: Path) -> None:
    run_id = "cached"

    async def body(journal: SQLiteJournal) -> Any:
        events = [submitted(run_id), step(AttemptStarted, run_id, 1, attempt=1)]
        events += task_steps(run_id, 2, 0, ["k"], "first")
        events += task_steps(run_id, 5, 1, ["k"], "second")
        await journal.append(events)
        return await journal.cached_result(run_id, ["k"])

    assert run_async(tmp_path / "j.db", body) == "second"


def test_reading_a_damaged_journal_says_so_and_names_doctor(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    for n in range(50):
        run_async(path, lambda j, n=n: j.append(completed_run(f"run-{n:03d}")))
    # Every page but the first (the schema) overwritten, as a failing disk or
    # a stray write would.
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xa5" * (size - 4096))
    for read in (
        lambda: read_history_sync(path, "run-007"),
        lambda: read_runs_sync(path),
    ):
        with pytest.raises(JournalError, match=r"damaged.*coda doctor"):
            read()


def test_a_journal_in_a_folder_the_reader_cannot_write_is_read_as_immutable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As another user would see a supervisor's journal with none running:
    # SQLite could not make the -shm file a WAL reader needs. (This process
    # may write anywhere as root, so the folder's answer is what it is told.)
    path = tmp_path / "j.db"
    run_async(path, lambda j: j.append(completed_run("done")))
    assert not Path(f"{path}-wal").exists()
    folder = str(path.parent)
    real_access = os.access

    def no_writing_here(where: Any, mode: int, **kwargs: Any) -> bool:
        if str(where) == folder and mode == os.W_OK:
            return False
        return real_access(where, mode, **kwargs)

    monkeypatch.setattr(os, "access", no_writing_here)
    assert schema.ro_uri(path).endswith("?mode=ro&immutable=1")
    assert [r.run_id for r in read_runs_sync(path)] == ["done"]
    assert read_history_sync(path, "done") == completed_run("done")
    assert not Path(f"{path}-shm").exists()
    # With a WAL beside it a writer may have it open: never immutable.
    Path(f"{path}-wal").touch()
    assert schema.ro_uri(path).endswith("?mode=ro")
