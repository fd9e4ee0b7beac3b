"""Acknowledgements come after durability, even for a duplicate submission.

In-process, against a journal whose appends wait for a gate: while the first
submission of a run id is being written, a second submission of the same id
must not be answered (it would be an acknowledgement of something that a crash
at that moment loses).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from coda.definitions import Registry, workflow
from coda.errors import JournalError
from coda.journal.events import Event
from coda.journal.sqlite import SQLiteJournal
from coda.runtime.supervisor import Supervisor

registry = Registry()


@workflow(name="noop", registry=registry)
async def noop() -> None:  # pragma: no cover - never activated: no workers
    return None


class GatedJournal:
    """A journal whose appends are held until `gate` is set."""

    def __init__(self, inner: SQLiteJournal) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.durable: set[str] = set()

    async def append(self, events: Sequence[Event]) -> None:
        await self.gate.wait()
        await self.inner.append(events)
        self.durable.update(e.run_id for e in events)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_duplicate_submission_is_answered_only_once_durable(tmp_path: Path) -> None:
    asyncio.run(_duplicate_submission(tmp_path))


async def _duplicate_submission(tmp_path: Path) -> None:
    inner = await SQLiteJournal.open(tmp_path / "coda.db")
    journal = GatedJournal(inner)
    supervisor = Supervisor(journal, "unused", registry, workers=0)
    journal.gate.set()
    await supervisor.start()
    journal.gate.clear()
    try:
        first = asyncio.create_task(supervisor.submit("noop", {}, "r1"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(supervisor.submit("noop", {}, "r1"))
        await asyncio.sleep(0.05)
        assert not second.done() or "r1" in journal.durable, (
            "the duplicate submission was answered before the run was durable"
        )
        journal.gate.set()
        assert await first == ("r1", True)
        assert await second == ("r1", False)
        assert "r1" in journal.durable
    finally:
        journal.gate.set()
        await supervisor.stop()
        await inner.close()


class RefusingJournal(GatedJournal):
    """Refuses the appends of runs named in `refuse`, as a full disk would."""

    def __init__(self, inner: SQLiteJournal) -> None:
        super().__init__(inner)
        self.gate.set()
        self.refuse: set[str] = set()

    async def append(self, events: Sequence[Event]) -> None:
        if self.refuse & {e.run_id for e in events}:
            raise JournalError("the disk is full (refused on purpose)")
        await super().append(events)


def test_a_submission_the_journal_refused_is_not_acknowledged(
    tmp_path: Path,
) -> None:
    asyncio.run(_refused_submission(tmp_path))


async def _refused_submission(tmp_path: Path) -> None:
    inner = await SQLiteJournal.open(tmp_path / "coda.db")
    journal = RefusingJournal(inner)
    supervisor = Supervisor(journal, "unused", registry, workers=0)
    failures: list[str] = []
    handler = _Collect(failures)
    logging.getLogger("coda.runtime.supervisor").addHandler(handler)
    await supervisor.start()
    try:
        journal.refuse.add("r1")
        with pytest.raises(JournalError):
            await supervisor.submit("noop", {}, "r1")
        # Not acknowledged, so not a run: asking again must create it.
        assert "r1" not in supervisor.runs
        await asyncio.sleep(1.5)  # the supervisor's own recovery from the failure
        assert "r1" not in supervisor.runs
        journal.refuse.clear()
        assert await supervisor.submit("noop", {}, "r1") == ("r1", True)
        assert "r1" in journal.durable
        assert failures == []
    finally:
        logging.getLogger("coda.runtime.supervisor").removeHandler(handler)
        await supervisor.stop()
        await inner.close()


class _Collect(logging.Handler):
    """Collects the supervisor's reports of its own steps failing."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.into.append(self.format(record))


def test_a_cancellation_that_changed_nothing_says_so(tmp_path: Path) -> None:
    asyncio.run(_cancel_of_a_finishing_run(tmp_path))


async def _cancel_of_a_finishing_run(tmp_path: Path) -> None:
    # The run's end is decided but still being written (here: a first
    # cancellation); a cancellation now changes nothing and must not answer
    # "changed", or a client would believe in a cancellation the journal
    # never gets (the chaos test saw a run end completed that way).
    inner = await SQLiteJournal.open(tmp_path / "coda.db")
    journal = GatedJournal(inner)
    journal.gate.set()
    supervisor = Supervisor(journal, "unused", registry, workers=0)
    await supervisor.start()
    try:
        assert await supervisor.submit("noop", {}, "r1") == ("r1", True)
        journal.gate.clear()
        first = asyncio.create_task(supervisor.cancel("r1", "first"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(supervisor.cancel("r1", "second"))
        await asyncio.sleep(0.05)
        journal.gate.set()
        assert await first is True
        assert await second is False
    finally:
        journal.gate.set()
        await supervisor.stop()
        await inner.close()
