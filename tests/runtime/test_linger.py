"""A new run's submission shares its commit with the run's first steps.

The supervisor starts a new run's workflow code while the submission waits to
be written, and lets the submission linger (`Supervisor.LINGER`) for the
commands that code sends back, so that a one-task run takes one fsync less.
The supervisor runs in this process on a journal that records every append,
with real worker processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from coda.definitions import Registry, load_app
from coda.journal.events import (
    AttemptStarted,
    Event,
    RunSubmitted,
    TaskScheduled,
    TaskStarted,
)
from coda.journal.sqlite import SQLiteJournal
from coda.runtime.supervisor import Supervisor

from .support import APP, APPS, base_env


class RecordingJournal(SQLiteJournal):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.appends: list[list[Event]] = []

    async def append(self, events: Sequence[Event]) -> None:
        self.appends.append(list(events))
        await super().append(events)


def _kinds(events: list[Event], run_id: str) -> list[type[Event]]:
    return [type(e) for e in events if e.run_id == run_id]


@pytest.fixture(autouse=True)
def _app_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))


async def _supervisor(path: Path, workers: int, linger: float) -> Supervisor:
    journal = await RecordingJournal.open(path)
    registry: Registry = load_app(APP)
    supervisor = Supervisor(
        journal, APP, registry, workers=workers, worker_env=base_env()
    )
    supervisor.LINGER = linger
    await supervisor.start()
    return supervisor


def test_a_submission_and_the_first_step_share_one_commit(tmp_path: Path) -> None:
    asyncio.run(_first_step_in_the_submission_commit(tmp_path))


async def _first_step_in_the_submission_commit(tmp_path: Path) -> None:
    # A linger far longer than the test may take: only the run's commands can
    # end it, so a submission that returns proves they did.
    supervisor = await _supervisor(tmp_path / "coda.db", workers=1, linger=60.0)
    journal = supervisor.journal
    assert isinstance(journal, RecordingJournal)
    try:
        for i in range(3):
            run_id = f"quick-{i}"
            async with asyncio.timeout(20):
                assert await supervisor.submit("quick", {"x": i}, run_id) == (
                    run_id,
                    True,
                )
                summary = await supervisor.wait(run_id)
            assert summary is not None and summary.result == 2 * i + 1
            first = next(a for a in journal.appends if _kinds(a, run_id))
            assert _kinds(first, run_id) == [
                RunSubmitted,
                AttemptStarted,
                TaskScheduled,
                TaskStarted,
            ]
    finally:
        await supervisor.stop()
        await journal.close()


def test_a_submission_nobody_answers_is_written_after_the_linger(
    tmp_path: Path,
) -> None:
    asyncio.run(_submission_without_workers(tmp_path))


async def _submission_without_workers(tmp_path: Path) -> None:
    # No worker: the workflow code cannot start, and the submission must not
    # wait for it longer than the linger.
    supervisor = await _supervisor(tmp_path / "coda.db", workers=0, linger=0.2)
    journal = supervisor.journal
    try:
        started = time.monotonic()
        async with asyncio.timeout(10):
            assert await supervisor.submit("quick", {"x": 1}, "alone") == (
                "alone",
                True,
            )
        assert time.monotonic() - started >= 0.15
        history = await journal.history("alone")
        assert [type(e) for e in history] == [RunSubmitted, AttemptStarted]
    finally:
        await supervisor.stop()
        await journal.close()
