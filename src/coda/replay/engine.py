"""The replay engine: workflow code in, commands out, no I/O.

Theory of operation
-------------------
A workflow instance is fed the events of its run and answers with the commands
that its code produced and that the history does not yet record: schedule a task,
reuse a cached result, record a side effect, complete the run, fail the attempt.
It never reads a clock, a socket or the journal; the caller (the in-process
driver, a worker, a unit test) turns commands into events and feeds those back.
That is why a run's history replays exactly, anywhere.

Steps. Each `spawn_task()` and each `now()`/`uuid4()`/`random()` call is the
next step of the attempt, numbered from 0 in the order the code makes them. The
code runs on a `DeterministicLoop`, so that order depends only on the order in
which results are delivered.

Feeding events (`activate`) goes in two passes:

1. Look ahead: index every step record (`TaskScheduled`, `TaskReused`,
   `SideEffectRecorded`) and every attempt ending (`RunCompleted`,
   `AttemptFailed`) by attempt and step. When the code makes step n and the
   history has a record for it, the two must agree on kind, task name and
   cache key, or the run has diverged: `NondeterminismError`, naming the step,
   what the history says and what the code did. A recorded side effect gives the
   code its recorded value; a recorded reuse gives the recorded result.
2. In journal order, start attempts and resolve finished steps (`TaskCompleted`,
   final `TaskFailed`), running the loop until it is quiet after each one.
   Results go in one at a time, in journal order, in a live worker and in
   replay alike, so the code resumes in the same order and makes the same steps.

Only the last attempt's code is run: earlier attempts matter only for the
results they left in the cache.

Attempts and cache keys. Within an attempt every recorded step is reused. A new
attempt starts the code from the top; a task spawned with a `cache_key` whose
result was recorded in an earlier attempt is not scheduled again: the engine
answers `ReuseResult`, and the reuse becomes an event of its own.

At the end of a feed, a record the code never reached (the history has step 7,
the code stopped at 5) or an ending the code did not reach is divergence too.
"""

from __future__ import annotations

import asyncio
import contextvars
import random as _random
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs

from coda.definitions import TaskDef, WorkflowDef
from coda.errors import CodaError, NondeterminismError, TaskError
from coda.journal.events import (
    AttemptFailed,
    AttemptStarted,
    ErrorInfo,
    Event,
    RetryPolicy,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunSubmitted,
    SideEffectRecorded,
    TaskCompleted,
    TaskFailed,
    TaskReused,
    TaskScheduled,
)
from coda.replay.loop import DeterministicLoop
from coda.state import cache_token
from coda.values import DEFAULT_MAX_VALUE_BYTES, check_json, check_value

__all__ = [
    "Command",
    "CompleteRun",
    "FailAttempt",
    "RecordSideEffect",
    "ReuseResult",
    "ScheduleTask",
    "SideEffectSource",
    "WorkflowInstance",
    "current_instance",
]


@attrs.frozen
class ScheduleTask:
    attempt: int
    step: int
    task: str
    args: dict[str, Any]
    cache_key: list[Any] | None
    policy: RetryPolicy
    timeout: float | None


@attrs.frozen
class ReuseResult:
    attempt: int
    step: int
    task: str
    cache_key: list[Any]
    result: Any
    from_attempt: int


@attrs.frozen
class RecordSideEffect:
    attempt: int
    step: int
    kind: str
    value: Any


@attrs.frozen
class CompleteRun:
    attempt: int
    result: Any


@attrs.frozen
class FailAttempt:
    attempt: int
    error: ErrorInfo


Command = ScheduleTask | ReuseResult | RecordSideEffect | CompleteRun | FailAttempt


class SideEffectSource(Protocol):
    """Where fresh side-effect values come from (never consulted in replay)."""

    def now(self) -> float: ...
    def uuid4(self) -> str: ...
    def random(self) -> float: ...


class RealSideEffects:
    def now(self) -> float:
        return time.time()

    def uuid4(self) -> str:
        return str(uuid.uuid4())

    def random(self) -> float:
        return _random.random()


_current: contextvars.ContextVar[WorkflowInstance | None] = contextvars.ContextVar(
    "coda_workflow_instance", default=None
)


def current_instance() -> WorkflowInstance:
    instance = _current.get()
    if instance is None:
        raise CodaError(
            "coda.context is only available inside workflow code run by Coda "
            "(a workflow function, not a task or plain code)"
        )
    return instance


# A step as the code made it or as the history recorded it: (kind, task, key).
Descriptor = tuple[str, str, Any]


def _describe(descriptor: Descriptor) -> str:
    kind, task, cache_key = descriptor
    if kind != "task":
        return f"side effect {kind}()"
    key = "" if cache_key is None else f" with cache_key {cache_key!r}"
    return f"task {task!r}{key}"


def _record_descriptor(event: Event) -> Descriptor:
    if isinstance(event, (TaskScheduled, TaskReused)):
        return ("task", event.task, event.cache_key)
    assert isinstance(event, SideEffectRecorded)
    return (event.kind, "", None)


class WorkflowInstance:
    """One run's workflow code, kept alive between activations."""

    def __init__(
        self,
        workflow: WorkflowDef[..., Any],
        run_id: str,
        args: dict[str, Any],
        *,
        side_effects: SideEffectSource | None = None,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        self.workflow = workflow
        self.max_value_bytes = max_value_bytes
        self.verifying = False
        self.run_id = run_id
        self.args = args
        self.side_effects: SideEffectSource = side_effects or RealSideEffects()
        self.attempt = 0
        self.finished = False  # the run ended (completed, failed, cancelled)
        self._records: dict[tuple[int, int], Event] = {}
        self._endings: dict[int, Event] = {}
        # Results of steps with a cache key, by (task name, key): a key reuses
        # only a result of the same task.
        self._cache: dict[tuple[str, str], tuple[Any, int]] = {}
        # The task of every step this instance spawned, of every attempt.
        self._step_tasks: dict[tuple[int, int], str] = {}
        self._loop = DeterministicLoop()  # type: ignore[abstract]
        self._main: asyncio.Task[Any] | None = None
        self._futures: list[asyncio.Future[Any]] = []
        # The task of each step the current attempt spawned. A live instance is
        # fed only the events it did not make, so its own TaskScheduled records
        # are not in `_records`: a failed step's task name must come from here.
        self._task_names: dict[int, str] = {}
        self._ended = False  # the current attempt's code returned or raised
        # How the code ended each attempt, whether or not its history has the
        # ending: a replay reports what the code does now (its result, its
        # error), which production replay does not compare beyond completed
        # or failed (an error's message may well differ from one run to the
        # next, a memory address in it, say).
        self.endings_made: dict[int, CompleteRun | FailAttempt] = {}
        self._new: list[Command] = []
        self._divergence: NondeterminismError | None = None

    @classmethod
    def from_history(
        cls,
        workflow: WorkflowDef[..., Any],
        history: Sequence[Event],
        *,
        side_effects: SideEffectSource | None = None,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        verifying: bool = False,
    ) -> tuple[WorkflowInstance, list[Command]]:
        """A fresh instance fed a whole history: the pure replay entry point.

        `verifying` marks an instance that only checks a history another
        instance made (strict replay): its code counts as replaying throughout,
        so that the workflow logger stays quiet.
        """
        if not history or not isinstance(history[0], RunSubmitted):
            raise CodaError("a history starts with the run's RunSubmitted event")
        first = history[0]
        instance = cls(
            workflow,
            first.run_id,
            first.args,
            side_effects=side_effects,
            max_value_bytes=max_value_bytes,
        )
        instance.verifying = verifying
        return instance, instance.activate(history)

    @property
    def replaying(self) -> bool:
        """True while the code re-makes what its history already has: a step it
        records, or any part of an attempt whose end it records."""
        return (
            self.verifying
            or self.attempt in self._endings
            or (self.attempt, len(self._futures)) in self._records
        )

    # Feeding events.

    def activate(self, events: Sequence[Event]) -> list[Command]:
        """Feed new events of the run; return the commands the code made anew."""
        last_attempt = self.attempt
        for event in events:
            if event.run_id != self.run_id:
                continue
            if isinstance(event, (TaskScheduled, TaskReused, SideEffectRecorded)):
                self._records[(event.attempt, event.step)] = event
            elif isinstance(event, (RunCompleted, AttemptFailed)):
                self._endings[event.attempt] = event
            elif isinstance(event, AttemptStarted):
                last_attempt = event.attempt

        for event in events:
            if event.run_id != self.run_id:
                continue
            if isinstance(event, AttemptStarted) and event.attempt == last_attempt:
                self._start_attempt(event.attempt)
            elif isinstance(event, TaskCompleted):
                if event.cache_key is not None:
                    task = self._task_of(event.attempt, event.step)
                    self._cache[(task, cache_token(event.cache_key))] = (
                        event.result,
                        event.attempt,
                    )
                self._resolve(event, event.result, None)
            elif isinstance(event, TaskReused):
                self._cache[(event.task, cache_token(event.cache_key))] = (
                    event.result,
                    event.from_attempt,
                )
            elif isinstance(event, TaskFailed) and event.retry_at is None:
                self._resolve(event, None, event.error)
            elif isinstance(event, (RunCompleted, RunFailed, RunCancelled)):
                self.finished = True
            self._raise_divergence()

        self._check_history_reached()
        self._raise_divergence()
        new, self._new = self._new, []
        return new

    def _start_attempt(self, attempt: int) -> None:
        self.attempt = attempt
        self.finished = False  # a retried run's history ends a run, then reopens it
        if self._main is not None:
            # A new attempt gets a new loop: nothing the last one left queued or
            # pending may run in it. A fresh instance's loop has run nothing.
            self._loop.close()
            self._loop = DeterministicLoop()  # type: ignore[abstract]
        self._futures = []
        self._task_names = {}
        self._ended = False
        context = contextvars.copy_context()
        context.run(_current.set, self)
        self._main = self._loop.create_task(self._run_attempt(), context=context)
        self._loop.run_until_quiet()

    async def _run_attempt(self) -> None:
        attempt = self.attempt
        try:
            result = await self.workflow.fn(**self.args)
            if not _trivially_json(result, self.max_value_bytes):
                where = f"result of workflow {self.workflow.name}"
                check_value(result, where, self.max_value_bytes)
        except GeneratorExit:
            raise  # the attempt was dropped; its coroutine is being closed
        except BaseException as exc:  # every failure of workflow code is recorded
            self._end(attempt, FailAttempt(attempt, _error_info(exc)))
            return
        self._end(attempt, CompleteRun(attempt, result))

    def _end(self, attempt: int, command: CompleteRun | FailAttempt) -> None:
        self._ended = True
        self.endings_made[attempt] = command
        recorded = self._endings.get(attempt)
        if recorded is None:
            self._new.append(command)
            return
        matches = isinstance(command, CompleteRun) == isinstance(recorded, RunCompleted)
        if not matches:
            said = "completed" if isinstance(command, CompleteRun) else "failed"
            self._diverge(
                len(self._futures),
                _ending_description(recorded),
                f"the attempt {said}",
            )

    def _resolve(self, event: Event, result: Any, error: ErrorInfo | None) -> None:
        assert isinstance(event, (TaskCompleted, TaskFailed))
        if event.attempt != self.attempt or self._main is None:
            return  # a result for an attempt that is over: only the cache cares
        if event.step >= len(self._futures):
            record = self._records.get((event.attempt, event.step))
            recorded = _describe(_record_descriptor(record)) if record else "a task"
            made = "nothing (the attempt ended)" if self._main.done() else "nothing yet"
            self._diverge(event.step, f"{recorded} finishing", made)
            return
        future = self._futures[event.step]
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            name = self._task_names.get(event.step, "?")
            future.set_exception(
                TaskError(name, error.type, error.message, error.traceback, error.types)
            )
        self._loop.run_until_quiet()

    def _check_history_reached(self) -> None:
        if self._main is None or self._divergence is not None:
            return
        made = len(self._futures)
        if (self.attempt, made) in self._records and self._main.done():
            record = self._records[(self.attempt, made)]
            self._diverge(made, _describe(_record_descriptor(record)), "nothing")
        elif self.attempt in self._endings and not self._ended:
            ending = _ending_description(self._endings[self.attempt])
            self._diverge(made, ending, "code still waiting on a step")

    def _task_of(self, attempt: int, step: int) -> str:
        """The task a step ran: as this instance spawned it, or as recorded."""
        name = self._step_tasks.get((attempt, step))
        if name is None:
            record = self._records.get((attempt, step))
            name = record.task if isinstance(record, TaskScheduled) else ""
        return name

    # What workflow code calls, through coda.context.

    def spawn_task(
        self,
        task: TaskDef[..., Any],
        args: dict[str, Any],
        cache_key: list[Any] | None,
    ) -> asyncio.Future[Any]:
        if not isinstance(task, TaskDef):
            raise TypeError(
                f"spawn_task() takes a task declared with @coda.task, not {task!r}"
            )
        if not isinstance(args, dict):
            raise TypeError(f"args of task {task.name} must be a dict of keyword args")
        if not _trivially_json(args, self.max_value_bytes):
            check_value(args, f"args of task {task.name}", self.max_value_bytes)
        if cache_key is not None:
            if not isinstance(cache_key, list):
                raise TypeError(f"cache_key of task {task.name} must be a list")
            check_json(cache_key, f"cache_key of task {task.name}")

        step = len(self._futures)
        future = self._loop.create_future()
        self._futures.append(future)
        self._task_names[step] = task.name
        self._step_tasks[(self.attempt, step)] = task.name
        record = self._match(step, ("task", task.name, cache_key))
        if isinstance(record, TaskReused):
            future.set_result(record.result)
        elif record is None and self._divergence is None:
            hit = (
                self._cache.get((task.name, cache_token(cache_key)))
                if cache_key
                else None
            )
            if hit is not None and hit[1] < self.attempt:
                assert cache_key is not None
                self._new.append(
                    ReuseResult(
                        self.attempt, step, task.name, cache_key, hit[0], hit[1]
                    )
                )
                future.set_result(hit[0])
            else:
                self._new.append(
                    ScheduleTask(
                        self.attempt,
                        step,
                        task.name,
                        args,
                        cache_key,
                        task.policy,
                        task.timeout,
                    )
                )
        return future

    def side_effect(self, kind: str, fresh: Callable[[], Any]) -> Any:
        step = len(self._futures)
        future = self._loop.create_future()
        self._futures.append(future)
        record = self._match(step, (kind, "", None))
        if isinstance(record, SideEffectRecorded):
            value = record.value
        else:
            value = fresh()
            self._new.append(RecordSideEffect(self.attempt, step, kind, value))
        future.set_result(value)
        return value

    def _match(self, step: int, made: Descriptor) -> Event | None:
        record = self._records.get((self.attempt, step))
        if record is None:
            if self._ended_recorded_before(step):
                self._diverge(step, "the attempt ending here", _describe(made))
            return None
        recorded = _record_descriptor(record)
        if recorded != made:
            self._diverge(step, _describe(recorded), _describe(made))
        return record

    def _ended_recorded_before(self, step: int) -> bool:
        # The history ended this attempt and has no step here: the code now makes
        # more steps than it did.
        return self.attempt in self._endings

    def _diverge(self, step: int, recorded: str, produced: str) -> None:
        if self._divergence is None:
            self._divergence = NondeterminismError(
                self.run_id, self.attempt, step, recorded, produced
            )

    def _raise_divergence(self) -> None:
        if self._divergence is not None:
            self._loop.close()
            raise self._divergence


def _trivially_json(value: Any, limit: int) -> bool:
    """Whether `value` is JSON of at most five bytes (`false`), under `limit`.

    Most tasks take no arguments and most workflows return nothing, and each
    spawn and each ending would otherwise pay for a full `check_value`. A
    subclass of dict is not JSON, hence the exact type.
    """
    if limit < 5:
        return False
    if value is None or value is True or value is False:
        return True
    return type(value) is dict and not value


def _ending_description(event: Event) -> str:
    if isinstance(event, RunCompleted):
        return "the attempt completed"
    assert isinstance(event, AttemptFailed)
    return f"the attempt failed with {event.error.type}"


def _error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, TaskError):
        # Keep the remote description visible, not just "TaskError".
        text = "".join(traceback.format_exception(exc))
        if exc.remote_traceback:
            text = (
                f"{text}\nRemote traceback of task {exc.task}:\n{exc.remote_traceback}"
            )
        return ErrorInfo.from_exception(exc, text)
    return ErrorInfo.from_exception(exc, "".join(traceback.format_exception(exc)))
