"""The state of runs, as a fold over their events.

Theory of operation
-------------------
The journal holds facts; this module says what they add up to. `apply(state,
event)` moves one run's state forward by one event, and `fold(events)` applies a
sequence of them. Nothing here does I/O or reads a clock: the same events give
the same state, whether they are folded live one at a time as the supervisor
appends them, in one go at start-up, or in any chunks in between. The property
tests in `tests/test_state.py` hold the fold to exactly that.

Which event may follow which is written down once, in two tables:
`RUN_TRANSITIONS` for a run's status and `TASK_TRANSITIONS` for a task step's.
A transition that is not in its table is illegal: `apply` raises
`IllegalEvent`, naming the run and the event, and leaves the state as it was.
Numbering is checked the same way: an event's `seq` must be exactly the run's
next position (so a gap or a duplicate is caught), attempts and tries count up
by one, an attempt's steps come in order and only while it runs (nothing but
`RunFailed` may follow its final `AttemptFailed`), and a `TaskReused` needs a
result in the cache.

A run's status depends only on its events' labels (type name, plus whether a
failure is retried), which is what lets the journal keep its `runs` projection
in the same transaction without reading anything back.

For speed, `apply` updates the state object it is given in place; it touches
nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from coda.errors import CodaError
from coda.journal.events import (
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
    StepEvent,
    TaskCompleted,
    TaskFailed,
    TaskReused,
    TaskScheduled,
    TaskStarted,
)
from coda.values import dumps

__all__ = [
    "RUN_TRANSITIONS",
    "TASK_TRANSITIONS",
    "IllegalEvent",
    "RunState",
    "RunStatus",
    "StepState",
    "StepStatus",
    "apply",
    "cache_token",
    "event_label",
    "fold",
    "fold_runs",
]


class RunStatus(enum.StrEnum):
    PENDING = "pending"  # submitted or reopened; no attempt running yet
    RUNNING = "running"  # an attempt is running
    RETRYING = "retrying"  # an attempt failed; the next one waits for its backoff
    PARKED = "parked"  # code and history disagree; waits for fixed code
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED}


class StepStatus(enum.StrEnum):
    SCHEDULED = "scheduled"  # journaled, not yet handed to a worker
    STARTED = "started"  # a try is running in a worker
    BACKOFF = "backoff"  # a try failed; the next waits until retry_at
    COMPLETED = "completed"
    FAILED = "failed"  # failed for good; the workflow sees a TaskError
    RECORDED = "recorded"  # a side effect's value

    @property
    def finished(self) -> bool:
        return self in (StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.RECORDED)


S = RunStatus
_ACTIVE = (S.PENDING, S.RUNNING, S.RETRYING, S.PARKED)

# (status before, event label) -> status after. None stands for "no run yet".
RUN_TRANSITIONS: dict[tuple[RunStatus | None, str], RunStatus] = {
    (None, "RunSubmitted"): S.PENDING,
    (S.PENDING, "AttemptStarted"): S.RUNNING,
    (S.RETRYING, "AttemptStarted"): S.RUNNING,
    (S.RUNNING, "AttemptFailed:retry"): S.RETRYING,
    (S.RUNNING, "AttemptFailed:final"): S.RUNNING,  # RunFailed follows at once
    (S.RUNNING, "RunCompleted"): S.COMPLETED,
    (S.RUNNING, "RunFailed"): S.FAILED,  # only after AttemptFailed:final
    (S.RUNNING, "RunParked"): S.PARKED,
    (S.PARKED, "RunResumed"): S.RUNNING,
    (S.FAILED, "RunRetried"): S.PENDING,
    (S.CANCELLED, "RunRetried"): S.PENDING,
    **{(status, "RunCancelled"): S.CANCELLED for status in _ACTIVE},
    # Steps happen while the run is active. Results of tasks that were in flight
    # when an attempt failed or the run was parked still arrive, and still count
    # for the cache of later attempts.
    **{
        (status, label): status
        for status in _ACTIVE
        for label in (
            "TaskStarted",
            "TaskCompleted",
            "TaskFailed:retry",
            "TaskFailed:final",
        )
    },
    **{
        (S.RUNNING, label): S.RUNNING
        for label in ("TaskScheduled", "TaskReused", "SideEffectRecorded")
    },
}

T = StepStatus
# (step status before, event label) -> step status after.
TASK_TRANSITIONS: dict[tuple[StepStatus | None, str], StepStatus] = {
    (None, "TaskScheduled"): T.SCHEDULED,
    (None, "TaskReused"): T.COMPLETED,
    (None, "SideEffectRecorded"): T.RECORDED,
    (T.SCHEDULED, "TaskStarted"): T.STARTED,
    (T.BACKOFF, "TaskStarted"): T.STARTED,
    (T.STARTED, "TaskCompleted"): T.COMPLETED,
    (T.STARTED, "TaskFailed:retry"): T.BACKOFF,
    (T.STARTED, "TaskFailed:final"): T.FAILED,
    # A step can fail for good before a try starts: the run was cancelled, or no
    # worker knows the task.
    (T.SCHEDULED, "TaskFailed:final"): T.FAILED,
    (T.BACKOFF, "TaskFailed:final"): T.FAILED,
}


# Failures that are not the task's own: a lost worker has a budget of its own,
# an interruption by the supervisor stopping costs nothing.
LOST_WORKER = "coda.errors.WorkerLost"
INTERRUPTED = "coda.errors.Interrupted"


class IllegalEvent(CodaError, ValueError):
    """An event that cannot follow the run's history; the state is unchanged."""

    def __init__(self, run_id: str, event: Event, reason: str) -> None:
        self.run_id = run_id
        self.event = event
        super().__init__(
            f"run {run_id}: event #{event.seq} {type(event).__name__} is illegal "
            f"here: {reason}"
        )


@attrs.define
class StepState:
    attempt: int
    step: int
    kind: str  # "task" or a side effect's kind ("now", "uuid4", "random")
    status: StepStatus
    task: str = ""
    args: dict[str, Any] = attrs.field(factory=dict)
    cache_key: list[Any] | None = None
    policy: RetryPolicy = attrs.field(factory=RetryPolicy)
    timeout: float | None = None
    try_number: int = 0  # tries started so far
    failures: int = 0  # failed tries that count against max_retries
    lost_workers: int = 0  # tries whose worker died
    retry_at: float | None = None
    result: Any = None
    error: ErrorInfo | None = None
    reused_from: int | None = None


@attrs.define
class RunState:
    run_id: str
    workflow: str
    args: dict[str, Any]
    policy: RetryPolicy
    submitted_at: float
    status: RunStatus = RunStatus.PENDING
    attempt: int = 0
    next_step: int = 0  # number of steps the current attempt has so far
    attempt_ended: bool = False  # the current attempt completed or failed
    next_seq: int = 1
    updated_at: float = 0.0
    retry_at: float | None = None  # when the next attempt may start
    result: Any = None
    error: ErrorInfo | None = None
    # Steps of every attempt, by (attempt, step).
    steps: dict[tuple[int, int], StepState] = attrs.field(factory=dict)
    # Results of completed steps that had a cache key, by `cache_token(key)`,
    # with the attempt that produced them; later attempts reuse these.
    cache: dict[str, tuple[Any, int]] = attrs.field(factory=dict)

    def current_steps(self) -> list[StepState]:
        return [s for (a, _), s in sorted(self.steps.items()) if a == self.attempt]

    def open_steps(self) -> Iterator[StepState]:
        """The current attempt's steps that have not ended, newest first.

        Newest first: an open step is nearly always among the last, so a
        caller that stops at the first looks at few of a long run's steps
        (from the oldest, a run of 10,000 asked after each would be quadratic).
        """
        return (
            step
            for step in reversed(self.steps.values())
            if step.attempt == self.attempt and not step.status.finished
        )


def cache_token(cache_key: list[Any]) -> str:
    """A cache key as a dict key: its compact JSON text."""
    return dumps(cache_key).decode()


def event_label(event: Event) -> str:
    """The name under which an event appears in the transition tables."""
    name = type(event).__name__
    if isinstance(event, (AttemptFailed, TaskFailed)):
        return f"{name}:retry" if event.retry_at is not None else f"{name}:final"
    return name


def status_after(event: Event) -> RunStatus | None:
    """The run status an event leads to, whatever came before; None if unchanged.

    The journal uses this to keep its `runs` projection without reading back.
    """
    return _STATUS_BY_LABEL.get(event_label(event))


_STATUS_BY_LABEL: dict[str, RunStatus] = {}
for (_before, _label), _after in RUN_TRANSITIONS.items():
    if _before != _after and _label not in ("AttemptFailed:final",):
        _STATUS_BY_LABEL[_label] = _after


def apply(state: RunState | None, event: Event) -> RunState:
    """Move `state` forward by `event`; raise `IllegalEvent` if it cannot follow."""
    if state is None:
        if not isinstance(event, RunSubmitted):
            raise IllegalEvent(event.run_id, event, "the run was never submitted")
        if event.seq != 0:
            raise IllegalEvent(event.run_id, event, "a run's history starts at #0")
        return RunState(
            run_id=event.run_id,
            workflow=event.workflow,
            args=event.args,
            policy=event.policy,
            submitted_at=event.at,
            updated_at=event.at,
        )

    run_id = state.run_id
    if event.run_id != run_id:
        raise IllegalEvent(run_id, event, f"it belongs to run {event.run_id}")
    if event.seq != state.next_seq:
        raise IllegalEvent(
            run_id, event, f"expected position #{state.next_seq} in the history"
        )
    label = event_label(event)
    after = RUN_TRANSITIONS.get((state.status, label))
    if after is None:
        raise IllegalEvent(run_id, event, f"the run is {state.status.value}")
    failed_for_good = state.status is RunStatus.RUNNING and state.attempt_ended
    if failed_for_good != (label == "RunFailed"):
        # The table cannot tell a running attempt from one that just failed for
        # good (the run's status stays RUNNING between the two events).
        reason = (
            f"attempt {state.attempt} failed for good, so RunFailed must follow"
            if failed_for_good
            else "no attempt failed for good"
        )
        raise IllegalEvent(run_id, event, reason)
    if isinstance(event, StepEvent):
        _apply_step(state, event, label)
    else:
        _apply_run(state, event)
    state.status = after
    state.next_seq += 1
    state.updated_at = event.at
    return state


def _apply_run(state: RunState, event: Event) -> None:
    if isinstance(event, AttemptStarted):
        if event.attempt != state.attempt + 1:
            raise IllegalEvent(
                state.run_id, event, f"the next attempt is {state.attempt + 1}"
            )
        state.attempt = event.attempt
        state.attempt_ended = False
        state.next_step = 0
        state.retry_at = None
    elif isinstance(event, AttemptFailed):
        _check_attempt(state, event, event.attempt)
        state.attempt_ended = True
        state.error = event.error
        state.retry_at = event.retry_at
    elif isinstance(event, RunCompleted):
        _check_attempt(state, event, event.attempt)
        state.attempt_ended = True
        state.result = event.result
        state.error = None
    elif isinstance(event, RunParked):
        _check_attempt(state, event, event.attempt)
        state.error = event.error
    elif isinstance(event, RunFailed):
        state.error = event.error
    elif isinstance(event, (RunResumed, RunRetried, RunCancelled)):
        state.retry_at = None
    elif isinstance(event, RunSubmitted):
        raise IllegalEvent(state.run_id, event, "the run was submitted already")


def _check_attempt(state: RunState, event: Event, attempt: int) -> None:
    if attempt != state.attempt:
        raise IllegalEvent(
            state.run_id, event, f"attempt {attempt} is not the current {state.attempt}"
        )


def _apply_step(state: RunState, event: StepEvent, label: str) -> None:
    key = (event.attempt, event.step)
    step = state.steps.get(key)
    before = step.status if step is not None else None
    after = TASK_TRANSITIONS.get((before, label))
    if after is None:
        where = "no such step" if step is None else f"the step is {before}"
        raise IllegalEvent(
            state.run_id, event, f"{where} ({event.attempt}, {event.step})"
        )

    if step is None:
        # A new step belongs to the running attempt and comes next in its order.
        _check_attempt(state, event, event.attempt)
        if event.step != state.next_step:
            raise IllegalEvent(
                state.run_id, event, f"the attempt's next step is {state.next_step}"
            )
        if isinstance(event, TaskReused) and (
            cache_token(event.cache_key) not in state.cache
        ):
            raise IllegalEvent(
                state.run_id, event, f"no result is cached for key {event.cache_key!r}"
            )
        step = _new_step(event, after)
        state.steps[key] = step
        state.next_step += 1
    elif isinstance(event, TaskStarted):
        _check_try(state, step, event, step.try_number + 1)
        step.try_number = event.try_number
        step.retry_at = None
    elif isinstance(event, TaskCompleted):
        _check_try(state, step, event, step.try_number)
        step.result = event.result
        if step.cache_key is not None:
            state.cache[cache_token(step.cache_key)] = (event.result, event.attempt)
    elif isinstance(event, TaskFailed):
        _check_try(state, step, event, step.try_number)  # 0: before any try
        step.error = event.error
        step.retry_at = event.retry_at
        if event.error.is_a((LOST_WORKER,)):
            step.lost_workers += 1
        elif not event.error.is_a((INTERRUPTED,)):
            step.failures += 1
    step.status = after


def _check_try(
    state: RunState,
    step: StepState,
    event: TaskStarted | TaskCompleted | TaskFailed,
    expected: int,
) -> None:
    if event.try_number != expected:
        raise IllegalEvent(
            state.run_id,
            event,
            f"step ({step.attempt}, {step.step}) expects try {expected}",
        )


def _new_step(event: StepEvent, status: StepStatus) -> StepState:
    if isinstance(event, TaskScheduled):
        return StepState(
            attempt=event.attempt,
            step=event.step,
            kind="task",
            status=status,
            task=event.task,
            args=event.args,
            cache_key=event.cache_key,
            policy=event.policy,
            timeout=event.timeout,
        )
    if isinstance(event, TaskReused):
        return StepState(
            attempt=event.attempt,
            step=event.step,
            kind="task",
            status=status,
            task=event.task,
            cache_key=event.cache_key,
            result=event.result,
            reused_from=event.from_attempt,
        )
    assert isinstance(event, SideEffectRecorded)
    return StepState(
        attempt=event.attempt,
        step=event.step,
        kind=event.kind,
        status=status,
        result=event.value,
    )


def fold(events: Iterable[Event], state: RunState | None = None) -> RunState | None:
    """Apply `events` of one run, in order, to `state` (None: from nothing)."""
    for event in events:
        state = apply(state, event)
    return state


def fold_runs(
    events: Iterable[Event], states: dict[str, RunState] | None = None
) -> dict[str, RunState]:
    """Apply events of many runs, interleaved in any order that keeps each run's."""
    states = {} if states is None else states
    for event in events:
        states[event.run_id] = apply(states.get(event.run_id), event)
    return states
