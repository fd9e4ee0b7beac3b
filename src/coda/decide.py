"""Deciding which events follow: the policy half of the core, pure like the fold.

The replay engine says what the workflow code wants (commands); workers say how
task tries went (outcomes); the clock says what is due. This module turns each
of those into the events to append, applying every event to the run's state as
it makes it, so that positions (`seq`) and steps stay consistent and an illegal
event is caught before it reaches the journal. The supervisor and the in-process
driver both decide through here; they differ only in how they run tasks and
workflow code.

Retry decisions live here too, with the policy recorded in the history (the
task's in `TaskScheduled`, the workflow's in `RunSubmitted`), so that the
supervisor never needs the application's code to decide.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from coda.errors import InternalError, Interrupted, WorkerLost
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
    TaskCompleted,
    TaskFailed,
    TaskReused,
    TaskScheduled,
    TaskStarted,
)
from coda.replay.engine import (
    Command,
    CompleteRun,
    FailAttempt,
    RecordSideEffect,
    ReuseResult,
    ScheduleTask,
)
from coda.state import (
    INTERRUPTED,
    LOST_WORKER,
    IllegalEvent,
    RunState,
    RunStatus,
    StepState,
    StepStatus,
    apply,
)

__all__ = [
    "cancel",
    "due_steps",
    "interrupt_started",
    "new_run",
    "on_commands",
    "on_task_failure",
    "on_task_result",
    "park",
    "resume",
    "retry_run",
    "start_attempt",
    "start_task",
]


def _emit(
    state: RunState, out: list[Event], cls: type[Event], now: float, **fields: Any
) -> None:
    event = cls(run_id=state.run_id, seq=state.next_seq, at=now, **fields)
    try:
        apply(state, event)
    except IllegalEvent as exc:
        raise InternalError(
            f"Coda decided an illegal event; this is a bug: {exc}"
        ) from exc
    out.append(event)


def new_run(
    run_id: str, workflow: str, args: dict[str, Any], policy: RetryPolicy, now: float
) -> tuple[RunState, list[Event]]:
    """A submission: the run's first events, its first attempt included."""
    submitted = RunSubmitted(
        run_id=run_id, seq=0, at=now, workflow=workflow, args=args, policy=policy
    )
    state = apply(None, submitted)
    out: list[Event] = [submitted]
    _emit(state, out, AttemptStarted, now, attempt=1)
    return state, out


# A command and the event recording it have the same fields, by name.
_EVENT_OF: dict[type[Command], type[Event]] = {
    ScheduleTask: TaskScheduled,
    ReuseResult: TaskReused,
    RecordSideEffect: SideEffectRecorded,
    CompleteRun: RunCompleted,
}
# Their field names, looked up once: `attrs.asdict` works them out per call.
_FIELDS_OF: dict[type[Command], tuple[str, ...]] = {
    cls: tuple(field.name for field in attrs.fields(cls)) for cls in _EVENT_OF
}


def on_commands(
    state: RunState, commands: Iterable[Command], now: float
) -> list[Event]:
    """Events for what an activation of the workflow code produced."""
    out: list[Event] = []
    for command in commands:
        if state.status is not RunStatus.RUNNING or command.attempt != state.attempt:
            continue  # cancelled, parked or superseded while the code was running
        if isinstance(command, FailAttempt):
            _fail_attempt(state, out, command.error, now)
        else:
            kind = type(command)
            fields = {name: getattr(command, name) for name in _FIELDS_OF[kind]}
            _emit(state, out, _EVENT_OF[kind], now, **fields)
    return out


def _fail_attempt(
    state: RunState, out: list[Event], error: ErrorInfo, now: float
) -> None:
    policy = state.policy
    retry = state.attempt <= policy.max_retries and error.is_a(policy.retry_on)
    if retry:
        retry_at = now + policy.delay(state.attempt)
        _emit(
            state,
            out,
            AttemptFailed,
            now,
            attempt=state.attempt,
            error=error,
            retry_at=retry_at,
        )
    else:
        _emit(state, out, AttemptFailed, now, attempt=state.attempt, error=error)
        _emit(state, out, RunFailed, now, error=error)


def start_attempt(state: RunState, now: float) -> list[Event]:
    """The next attempt, when the run waits for one and its backoff is over."""
    out: list[Event] = []
    waiting = state.status is RunStatus.PENDING or (
        state.status is RunStatus.RETRYING and (state.retry_at or 0.0) <= now
    )
    if waiting:
        _emit(state, out, AttemptStarted, now, attempt=state.attempt + 1)
    return out


def start_task(
    state: RunState, step: StepState, worker: str, now: float
) -> list[Event]:
    out: list[Event] = []
    _emit(
        state,
        out,
        TaskStarted,
        now,
        attempt=step.attempt,
        step=step.step,
        try_number=step.try_number + 1,
        worker=worker,
    )
    return out


def _current_try(
    state: RunState, attempt: int, step: int, try_number: int
) -> StepState | None:
    """The step if `try_number` is its running try and the run still wants it."""
    found = state.steps.get((attempt, step))
    if (
        found is None
        or found.status is not StepStatus.STARTED
        or found.try_number != try_number
        or state.status.finished
    ):
        return None  # late, duplicate or superseded outcome: nothing to record
    return found


def on_task_result(
    state: RunState, attempt: int, step: int, try_number: int, result: Any, now: float
) -> list[Event]:
    out: list[Event] = []
    found = _current_try(state, attempt, step, try_number)
    if found is not None:
        _emit(
            state,
            out,
            TaskCompleted,
            now,
            attempt=attempt,
            step=step,
            try_number=try_number,
            result=result,
            cache_key=found.cache_key,
        )
    return out


def on_task_failure(
    state: RunState,
    attempt: int,
    step: int,
    try_number: int,
    error: ErrorInfo,
    now: float,
) -> list[Event]:
    """A failed try: another try after a backoff, or the step fails for good."""
    out: list[Event] = []
    found = _current_try(state, attempt, step, try_number)
    if found is None:
        return out
    policy = found.policy
    if error.is_a((INTERRUPTED,)):
        retry_at: float | None = now
    elif error.is_a((LOST_WORKER,)):
        lost = found.lost_workers + 1
        retry_at = now + policy.delay(lost) if lost <= policy.max_lost_workers else None
    else:
        failures = found.failures + 1
        allowed = failures <= policy.max_retries and error.is_a(policy.retry_on)
        retry_at = now + policy.delay(failures) if allowed else None
    _emit(
        state,
        out,
        TaskFailed,
        now,
        attempt=attempt,
        step=step,
        try_number=try_number,
        error=error,
        retry_at=retry_at,
    )
    return out


def lost_worker_error(task: str, detail: str) -> ErrorInfo:
    return ErrorInfo.from_exception(
        WorkerLost(f"the worker running task {task} died ({detail})")
    )


def interrupt_started(state: RunState, now: float, why: str) -> list[Event]:
    """Record every running try as interrupted; each runs again, at no cost."""
    out: list[Event] = []
    error = ErrorInfo.from_exception(Interrupted(why))
    for step in list(state.steps.values()):
        if step.status is StepStatus.STARTED:
            out += on_task_failure(
                state, step.attempt, step.step, step.try_number, error, now
            )
    return out


def due_steps(state: RunState, now: float) -> list[StepState]:
    """The current attempt's task steps waiting for a try: never started, or
    past their backoff. Steps of a failed attempt are not started any more."""
    if state.status.finished:
        return []
    return [
        step
        for step in state.steps.values()
        if step.attempt == state.attempt
        and (
            step.status is StepStatus.SCHEDULED
            or (step.status is StepStatus.BACKOFF and (step.retry_at or 0.0) <= now)
        )
    ]


def cancel(state: RunState, reason: str, now: float) -> list[Event]:
    out: list[Event] = []
    if not state.status.finished:
        _emit(state, out, RunCancelled, now, reason=reason)
    return out


def park(state: RunState, error: ErrorInfo, now: float) -> list[Event]:
    out: list[Event] = []
    if state.status is RunStatus.RUNNING:
        _emit(state, out, RunParked, now, attempt=state.attempt, error=error)
    return out


def resume(state: RunState, reason: str, now: float) -> list[Event]:
    out: list[Event] = []
    if state.status is RunStatus.PARKED:
        _emit(state, out, RunResumed, now, reason=reason)
    return out


def retry_run(state: RunState, reason: str, now: float) -> list[Event]:
    """Reopen a failed or cancelled run with a new attempt (cached results reused)."""
    out: list[Event] = []
    if state.status in (RunStatus.FAILED, RunStatus.CANCELLED):
        _emit(state, out, RunRetried, now, reason=reason)
        _emit(state, out, AttemptStarted, now, attempt=state.attempt + 1)
    return out
