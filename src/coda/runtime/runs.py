"""What the supervisor holds in memory: its unfinished runs, the summaries of
the runs it finished last, and its counters.

A `LiveRun` is one unfinished run: its state (the fold of its events), its
history, and which worker hosts its workflow instance. The state runs ahead
of the journal while decisions are being written; `durable` says how much of
the history is in the journal, and only that much may be told to anyone.
The supervisor and its parts (`coda.runtime.requests`, `.dispatch` and
`.activation`) share one dict of them.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

import attrs
import orjson

from coda.journal.base import RunSummary
from coda.journal.events import (
    AttemptStarted,
    Event,
    RunCancelled,
    TaskCompleted,
    TaskFailed,
)
from coda.runtime.pool import WorkerHandle
from coda.state import RunState

__all__ = ["FinishedRuns", "LiveRun", "Record", "Stats", "feeds"]


def feeds(event: Event) -> bool:
    """Whether a hosting instance needs this event (it made the others itself)."""
    if isinstance(event, TaskFailed):
        return event.retry_at is None
    return isinstance(event, (AttemptStarted, TaskCompleted, RunCancelled))


@attrs.define(eq=False)
class LiveRun:
    """An unfinished run in memory: its state, history and hosting."""

    state: RunState
    history: list[Event]
    host: WorkerHandle | None = None
    outbox: list[Event] = attrs.field(factory=list)
    activating: bool = False
    timer: asyncio.TimerHandle | None = None
    # Events at positions below this are durable. The state runs ahead of it
    # while decisions are being written; only what is durable may be told.
    durable: int = 0
    # The number of the last activation sent (`Activations` numbers them all
    # alike); a host's answer names the one it answers, and answers to earlier
    # ones are stale.
    activation: int = 0
    # An append of the run's failed and its state is being reread from the
    # journal: nothing is decided for it meanwhile (see
    # `Supervisor._recover_from`).
    reloading: bool = False
    # Hosts lost in a row while the run's code was running on them (see
    # `Activations.host_lost`); back to 0 once its code answers.
    host_losses: int = 0

    @property
    def run_id(self) -> str:
        return self.state.run_id

    @property
    def settled(self) -> bool:
        """Whether everything decided for the run is durable."""
        return self.durable >= self.state.next_seq


class Record(Protocol):
    """`Supervisor._record`: queue one run's events, act on them once durable."""

    def __call__(
        self, run: LiveRun, events: list[Event], *, linger: bool = ...
    ) -> asyncio.Future[bool]: ...


@attrs.define
class Stats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    parked: int = 0
    tasks_dispatched: int = 0
    tasks_reused: int = 0
    workers_lost: int = 0
    commits: int = 0
    events: int = 0


class FinishedRuns:
    """The summaries of the runs finished last, to answer waits from memory.

    A client that submits a burst of runs and then waits for each one asks
    for many of them after they finished. Each such wait read the run's
    summary from the journal: a hop to its reader's thread and back, one at a
    time. Under W2 (5,000 runs submitted at once), in about one repeat in
    three the waits came after their runs had finished, 4,800 reads queued
    up, and the supervisor spent twice the CPU a run (330 against 160 us).
    The summaries are the ones waiters of the live run got (`summarize`).

    Kept: the last KEPT runs within KEPT_BYTES of results and errors (their
    JSON size, measured once); a run with a larger result is not kept, and
    is read from the journal as before.
    """

    KEPT = 10_000
    KEPT_BYTES = 32 * 1024 * 1024

    def __init__(self) -> None:
        self._kept: collections.OrderedDict[str, tuple[RunSummary, int]] = (
            collections.OrderedDict()
        )
        self._bytes = 0

    def add(self, summary: RunSummary) -> None:
        self.drop(summary.run_id)
        size = _size(summary)
        if size > self.KEPT_BYTES // 64:
            return
        self._kept[summary.run_id] = (summary, size)
        self._bytes += size
        while len(self._kept) > self.KEPT or self._bytes > self.KEPT_BYTES:
            _, (_, dropped) = self._kept.popitem(last=False)
            self._bytes -= dropped

    def get(self, run_id: str) -> RunSummary | None:
        kept = self._kept.get(run_id)
        return None if kept is None else kept[0]

    def drop(self, run_id: str) -> None:
        """Forget a run's summary: it is live again (retried, resumed)."""
        kept = self._kept.pop(run_id, None)
        if kept is not None:
            self._bytes -= kept[1]


def _size(summary: RunSummary) -> int:
    """About how many bytes a summary holds (its result and error, as JSON)."""
    size = 200
    if summary.result is not None:
        size += len(orjson.dumps(summary.result))
    if summary.error is not None:
        error = summary.error
        size += len(error.message) + len(error.traceback) + len(error.type)
    return size
