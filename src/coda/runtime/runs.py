"""What the supervisor holds in memory: its unfinished runs, and its counters.

A `LiveRun` is one unfinished run: its state (the fold of its events), its
history, and which worker hosts its workflow instance. The state runs ahead
of the journal while decisions are being written; `durable` says how much of
the history is in the journal, and only that much may be told to anyone.
The supervisor and its parts (`coda.runtime.requests`, `.dispatch` and
`.activation`) share one dict of them.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import attrs

from coda.journal.events import (
    AttemptStarted,
    Event,
    RunCancelled,
    TaskCompleted,
    TaskFailed,
)
from coda.runtime.pool import WorkerHandle
from coda.state import RunState

__all__ = ["LiveRun", "Record", "Stats", "feeds"]


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
