"""The in-process driver: whole runs in one process, against a real journal.

`LocalRunner` does what the supervisor does, minus the processes: it appends a
run's events to the journal, activates the workflow code on the replay engine,
runs the tasks the code asks for on its own event loop (plain `def` tasks in
threads), and feeds results back, until the run finishes. Tests use it to run
workflows end to end without spawning anything; the journal it leaves is the
same as the supervisor's, so `coda history` and replay work on it.

Strict replay. With `strict_replay=True` (the default) every activation is
checked by replaying the run's whole history on a fresh instance: it must make
no new command and must not diverge. Workflow code that branches on the clock,
the random module or anything else outside its history is caught by an ordinary
unit test, long before it meets a crash in production.

Ordering matters as much here as in the supervisor: a task is started only
after its `TaskScheduled` is durable, and the workflow hears of a result only
after its event is durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coda import decide
from coda.definitions import Registry, WorkflowDef, default_registry
from coda.errors import (
    NondeterminismError,
    RunCancelled,
    RunFailedError,
    RunParkedError,
    TaskTimeout,
    UnknownNameError,
)
from coda.journal.base import Journal
from coda.journal.events import ErrorInfo, Event
from coda.replay.engine import (
    Command,
    CompleteRun,
    RecordSideEffect,
    ReuseResult,
    ScheduleTask,
    SideEffectSource,
    WorkflowInstance,
)
from coda.state import RunState, RunStatus, StepState, StepStatus, fold
from coda.values import DEFAULT_MAX_VALUE_BYTES, check_value

__all__ = ["LocalRunner", "new_run_id"]

logger = logging.getLogger(__name__)


def new_run_id() -> str:
    return uuid.uuid4().hex


class LocalRunner:
    """Run workflows to completion in this process, journaling every step."""

    def __init__(
        self,
        journal: Journal,
        registry: Registry | None = None,
        *,
        strict_replay: bool = True,
        side_effects: SideEffectSource | None = None,
        clock: Callable[[], float] = time.time,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        self.journal = journal
        self.max_value_bytes = max_value_bytes
        self.registry = registry or default_registry
        self.strict_replay = strict_replay
        self.side_effects = side_effects
        self.clock = clock
        self.tasks_executed = 0

    @classmethod
    async def open(cls, path: str | Path, **kwargs: Any) -> LocalRunner:
        from coda.journal.sqlite import SQLiteJournal

        return cls(await SQLiteJournal.open(str(path)), **kwargs)

    async def close(self) -> None:
        await self.journal.close()

    async def __aenter__(self) -> LocalRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run(
        self,
        workflow: WorkflowDef[..., Any] | str,
        args: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> Any:
        """Submit a run and drive it to its end; return its result.

        Raises `RunFailedError` if the run fails, `NondeterminismError` if it
        diverges from its history, live or on strict replay (the run is then
        parked in the journal, unless it had ended already).
        """
        run_id = await self.submit(workflow, args, run_id=run_id)
        return await self.drive(run_id)

    async def submit(
        self,
        workflow: WorkflowDef[..., Any] | str,
        args: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> str:
        definition = self._workflow(workflow)
        args = {} if args is None else args
        check_value(args, f"args of workflow {definition.name}", self.max_value_bytes)
        run_id = run_id or new_run_id()
        if await self.journal.run(run_id) is not None:
            return run_id  # the same id twice is the same run
        _, events = decide.new_run(
            run_id, definition.name, args, definition.policy, self.clock()
        )
        await self.journal.append(events)
        return run_id

    async def drive(self, run_id: str) -> Any:
        """Drive an existing run (new, interrupted or parked-and-fixed) to its end."""
        history = await self.journal.history(run_id)
        state = _fold(history)
        definition = self._workflow(state.workflow)
        if state.status is RunStatus.PARKED:
            history += await self._append(
                state, decide.resume(state, "driven again", self.clock())
            )
        history += await self._append(
            state, decide.interrupt_started(state, self.clock(), "driver restarted")
        )
        return await _RunLoop(self, definition, state, history).drive()

    def _workflow(self, workflow: WorkflowDef[..., Any] | str) -> WorkflowDef[..., Any]:
        if isinstance(workflow, WorkflowDef):
            return workflow
        return self.registry.workflow(workflow)

    async def _append(self, state: RunState, events: list[Event]) -> list[Event]:
        if events:
            await self.journal.append(events)
        return events


def _fold(history: list[Event]) -> RunState:
    state = fold(history)
    assert state is not None
    return state


class _RunLoop:
    """One run's drive: activate, append, run due tasks, wait, repeat."""

    def __init__(
        self,
        runner: LocalRunner,
        definition: WorkflowDef[..., Any],
        state: RunState,
        history: list[Event],
    ) -> None:
        self.runner = runner
        self.definition = definition
        self.state = state
        self.history = history
        self.instance = WorkflowInstance(
            definition,
            state.run_id,
            state.args,
            side_effects=runner.side_effects,
            max_value_bytes=runner.max_value_bytes,
        )
        self.unfed: list[Event] = list(history)
        self.running: dict[asyncio.Task[Any], StepState] = {}
        self.divergence: NondeterminismError | None = None

    async def drive(self) -> Any:
        runner = self.runner
        state = self.state
        while not _settled(state):
            now = runner.clock()
            await self._append(decide.start_attempt(state, now))
            await self._activate()
            if self.divergence is not None:
                break
            for step in decide.due_steps(state, runner.clock()):
                await self._start(step)
            if _settled(state):
                break
            if self.unfed and state.status is RunStatus.RUNNING:
                continue  # the code has results to see; a waiting run has not
            await self._wait()

        for task in self.running:
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)
        if self.divergence is not None:
            raise self.divergence
        if state.status is RunStatus.COMPLETED:
            return state.result
        error = state.error or ErrorInfo("coda.errors.CodaError", "unknown")
        if state.status is RunStatus.CANCELLED:
            raise RunCancelled(f"run {state.run_id} was cancelled")
        if state.status is RunStatus.PARKED:
            raise RunParkedError(state.run_id, error.message)
        raise RunFailedError(state.run_id, error.type, error.message, error.traceback)

    async def _append(self, events: list[Event]) -> None:
        if events:
            await self.runner.journal.append(events)
            self.history += events
            self.unfed += events

    async def _activate(self) -> None:
        if not self.unfed or self.state.status is not RunStatus.RUNNING:
            return
        feed, self.unfed = self.unfed, []
        now = self.runner.clock()
        try:
            commands = self.instance.activate(feed)
        except NondeterminismError as exc:
            await self._diverged(exc, now)
            return
        await self._append(decide.on_commands(self.state, commands, now))
        # The instance made these events itself; feeding them back would only
        # confirm what it knows.
        self.unfed = []
        if self.runner.strict_replay:
            try:
                self._check_full_replay()
            except NondeterminismError as exc:
                await self._diverged(exc, now)

    def _check_full_replay(self) -> None:
        # A fresh instance fed the whole history must agree with the live one:
        # no divergence, nothing new to do. Anything else means the workflow
        # code depends on something its history does not hold.
        _, commands = WorkflowInstance.from_history(
            self.definition,
            self.history,
            max_value_bytes=self.runner.max_value_bytes,
            verifying=True,
        )
        if commands:
            first = commands[0]
            step = getattr(first, "step", self.state.next_step)
            raise NondeterminismError(
                self.state.run_id,
                first.attempt,
                step,
                "nothing more (the live run stopped here)",
                f"{_describe(first)} on replay",
            )

    async def _diverged(self, exc: NondeterminismError, now: float) -> None:
        # Park the run if it still runs (strict replay may catch a divergence
        # only once the run has ended) and stop, to raise `exc` to the caller.
        logger.warning("run %s diverged from its history: %s", exc.run_id, exc)
        await self._append(decide.park(self.state, _divergence_info(exc), now))
        self.unfed = []
        self.divergence = exc

    async def _start(self, step: StepState) -> None:
        now = self.runner.clock()
        started = decide.start_task(self.state, step, "local", now)
        await self._append(started)
        task = asyncio.ensure_future(self._execute(step, step.try_number))
        self.running[task] = step

    async def _execute(self, step: StepState, try_number: int) -> tuple[bool, Any]:
        runner = self.runner
        try:
            definition = runner.registry.task(step.task)
        except UnknownNameError as exc:
            return False, ErrorInfo.from_exception(exc)
        runner.tasks_executed += 1
        try:
            if definition.is_async:
                call = definition.fn(**step.args)
            else:
                call = asyncio.to_thread(definition.fn, **step.args)
            if step.timeout is not None:
                result = await asyncio.wait_for(call, step.timeout)
            else:
                result = await call
            check_value(result, f"result of task {step.task}", runner.max_value_bytes)
        except TimeoutError:
            info = ErrorInfo.from_exception(
                TaskTimeout(f"task {step.task} ran past its timeout of {step.timeout}s")
            )
            return False, info
        except BaseException as exc:  # every failure of a task is recorded
            if isinstance(exc, asyncio.CancelledError) and _cancelled_by_us():
                raise
            text = "".join(traceback.format_exception(exc))
            return False, ErrorInfo.from_exception(exc, text)
        return True, result

    async def _wait(self) -> None:
        state = self.state
        # Wait for a task to finish or the next backoff to end, whichever is
        # first: the next attempt, or a step's next try, need not wait for a
        # long task of an earlier attempt.
        due = [
            s.retry_at
            for s in state.steps.values()
            if s.attempt == state.attempt
            and s.status is StepStatus.BACKOFF
            and s.retry_at is not None
        ]
        if state.status is RunStatus.RETRYING and state.retry_at is not None:
            due.append(state.retry_at)
        timeout = max(0.0, min(due) - self.runner.clock()) if due else None
        if not self.running:
            if timeout is None:
                raise RuntimeError(
                    f"run {state.run_id} is stuck: no task in flight and nothing "
                    "due, so its workflow code waits on something that is not a "
                    "step (workflow code may await only spawned tasks); if it does "
                    "not, this is a bug in Coda, please report it"
                )
            await asyncio.sleep(timeout)
            return
        done, _ = await asyncio.wait(
            self.running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in sorted(done, key=lambda t: _step_key(self.running[t])):
            step = self.running.pop(task)
            ok, value = task.result()
            now = self.runner.clock()
            if ok:
                events = decide.on_task_result(
                    state, step.attempt, step.step, step.try_number, value, now
                )
            else:
                events = decide.on_task_failure(
                    state, step.attempt, step.step, step.try_number, value, now
                )
            await self._append(events)


def _step_key(step: StepState) -> tuple[int, int]:
    # Outcomes that arrive together are recorded in step order (`done` is a
    # set), attempt first: a late task of an earlier attempt has low numbers.
    return (step.attempt, step.step)


def _settled(state: RunState) -> bool:
    """Whether the run needs nothing more from this driver."""
    return state.status.finished or state.status is RunStatus.PARKED


def _cancelled_by_us() -> bool:
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0


def _describe(command: Command) -> str:
    if isinstance(command, (ScheduleTask, ReuseResult)):
        key = (
            ""
            if command.cache_key is None
            else f" with cache_key {command.cache_key!r}"
        )
        return f"task {command.task!r}{key}"
    if isinstance(command, RecordSideEffect):
        return f"side effect {command.kind}()"
    if isinstance(command, CompleteRun):
        return "the attempt completed"
    return f"the attempt failed with {command.error.type}"


def _divergence_info(exc: NondeterminismError) -> ErrorInfo:
    return ErrorInfo.from_exception(exc, "".join(traceback.format_exception(exc)))
