"""Tests for coda.driver: LocalRunner, the in-process driver."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import coda
from coda import decide
from coda.definitions import WorkflowDef
from coda.errors import (
    NondeterminismError,
    RunCancelled,
    RunFailedError,
    TaskError,
)
from coda.journal import events as ev
from coda.journal.memory import MemoryJournal
from coda.state import fold

REGISTRY = coda.Registry()
JOURNAL: list[MemoryJournal] = []  # the journal of the run in progress
SEEN: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _fresh() -> None:
    JOURNAL.clear()
    SEEN.clear()


@coda.task(name="driver.double", registry=REGISTRY)
async def double(n: int) -> int:
    return 2 * n


@coda.task(name="driver.look", registry=REGISTRY)
async def look(step: int) -> list[str]:
    # What the journal holds while this task runs.
    return [
        type(e).__name__
        for e in JOURNAL[0].events["r"]
        if getattr(e, "step", None) == step
    ]


@coda.task(name="driver.where", registry=REGISTRY)
def where() -> str:
    return "main" if threading.current_thread() is threading.main_thread() else "thread"


@coda.task(name="driver.sleepy", registry=REGISTRY, timeout=0.05)
async def sleepy() -> None:
    await asyncio.sleep(5)


@coda.task(name="driver.slow", registry=REGISTRY)
async def slow() -> str:
    await asyncio.sleep(0.1)
    return "slow"


@coda.task(name="driver.boom", registry=REGISTRY)
async def boom() -> None:
    raise ValueError("boom")


UNREGISTERED = coda.task(name="driver.unregistered", registry=coda.Registry())(
    double.fn
)


def workflow(name: str, **policy: Any) -> Callable[[Any], WorkflowDef[..., Any]]:
    def wrap(fn: Any) -> WorkflowDef[..., Any]:
        definition = coda.workflow(name=name, registry=coda.Registry(), **policy)(fn)
        return definition

    return wrap


def runner_for(
    definition: WorkflowDef[..., Any], journal: MemoryJournal | None = None, **kw: Any
) -> coda.LocalRunner:
    registry = coda.Registry(tasks=dict(REGISTRY.tasks))
    registry.add_workflow(definition)
    journal = journal or MemoryJournal()
    JOURNAL.append(journal)
    return coda.LocalRunner(journal, registry, **kw)


def run(
    definition: WorkflowDef[..., Any], args: dict[str, Any] | None = None, **kw: Any
) -> Any:
    runner = runner_for(definition, **kw)
    return asyncio.run(runner.run(definition, args, run_id="r"))


@workflow("driver.basic")
async def basic(n: int) -> Any:
    a, b = await asyncio.gather(
        coda.context.spawn_task(double, {"n": n}),
        coda.context.spawn_task(double, {"n": n + 1}),
    )
    return a + b


def test_a_run_goes_to_its_end_and_its_history_is_journaled() -> None:
    runner = runner_for(basic)
    assert asyncio.run(runner.run(basic, {"n": 1}, run_id="r")) == 6
    history = JOURNAL[0].events["r"]
    assert [type(e).__name__ for e in history] == [
        "RunSubmitted",
        "AttemptStarted",
        "TaskScheduled",
        "TaskScheduled",
        "TaskStarted",
        "TaskStarted",
        "TaskCompleted",
        "TaskCompleted",
        "RunCompleted",
    ]
    summary = asyncio.run(JOURNAL[0].run("r"))
    assert (summary.status, summary.result, summary.attempt) == ("completed", 6, 1)
    assert runner.tasks_executed == 2


def test_tasks_start_only_after_their_scheduling_is_journaled() -> None:
    @workflow("driver.write_ahead")
    async def write_ahead() -> Any:
        first = await coda.context.spawn_task(look, {"step": 0})
        second = await coda.context.spawn_task(look, {"step": 1})
        return [first, second]

    assert run(write_ahead) == [
        ["TaskScheduled", "TaskStarted"],
        ["TaskScheduled", "TaskStarted"],
    ]


def test_the_same_run_id_is_the_same_run() -> None:
    runner = runner_for(basic)

    async def twice() -> tuple[Any, Any]:
        first = await runner.run(basic, {"n": 1}, run_id="r")
        second = await runner.run(basic, {"n": 100}, run_id="r")
        return first, second

    assert asyncio.run(twice()) == (6, 6)
    assert runner.tasks_executed == 2


def test_driving_a_finished_run_reports_its_end_again() -> None:
    @workflow("driver.fails")
    async def fails() -> None:
        await coda.context.spawn_task(boom)

    runner = runner_for(fails)
    with pytest.raises(RunFailedError) as first:
        asyncio.run(runner.run(fails, run_id="r"))
    assert (first.value.run_id, first.value.error_type) == (
        "r",
        "coda.errors.TaskError",
    )
    with pytest.raises(RunFailedError):
        asyncio.run(runner.drive("r"))
    assert runner.tasks_executed == 1


def test_a_cancelled_run_raises_run_cancelled() -> None:
    runner = runner_for(basic)

    async def cancel_then_drive() -> Any:
        await runner.submit(basic, {"n": 1}, run_id="r")
        state = fold(await runner.journal.history("r"))
        assert state is not None
        await runner.journal.append(decide.cancel(state, "test", 1.0))
        return await runner.drive("r")

    with pytest.raises(RunCancelled, match="run r was cancelled"):
        asyncio.run(cancel_then_drive())


def test_plain_def_tasks_run_in_a_thread() -> None:
    @workflow("driver.threads")
    async def threads() -> Any:
        return await coda.context.spawn_task(where)

    assert run(threads) == "thread"


def test_a_task_past_its_timeout_fails_with_task_timeout() -> None:
    @workflow("driver.timeouts")
    async def timeouts() -> Any:
        try:
            await coda.context.spawn_task(sleepy)
        except TaskError as exc:
            return [exc.remote_type, exc.remote_message]

    started = time.monotonic()
    assert run(timeouts) == [
        "coda.errors.TaskTimeout",
        "task driver.sleepy ran past its timeout of 0.05s",
    ]
    assert time.monotonic() - started < 2


def test_a_task_the_runner_does_not_know_fails_the_step() -> None:
    @workflow("driver.unknown")
    async def unknown() -> Any:
        try:
            await coda.context.spawn_task(UNREGISTERED, {"n": 1})
        except TaskError as exc:
            return exc.remote_type

    assert run(unknown) == "coda.errors.UnknownNameError"


def test_an_unknown_workflow_name_is_refused() -> None:
    runner = runner_for(basic)
    with pytest.raises(coda.UnknownNameError, match="no workflow named 'nope'"):
        asyncio.run(runner.run("nope"))


def test_waiting_for_the_next_attempt_does_not_spin() -> None:
    # While a run waits out its backoff, with a task of the failed attempt
    # still running, the driver must sleep, not poll the clock in a loop.
    readings = [0]

    def clock() -> float:
        readings[0] += 1
        return time.time()

    @workflow("driver.backoff", max_retries=1, backoff=0.3)
    async def backoff() -> Any:
        if coda.context.attempt() == 1:
            await asyncio.gather(
                coda.context.spawn_task(slow, cache_key=["slow"]),
                coda.context.spawn_task(boom),
            )
        return await coda.context.spawn_task(slow, cache_key=["slow"])

    assert run(backoff, clock=clock) == "slow"
    assert readings[0] < 100


# Strict replay catches workflow code that reads what its history does not hold.


def test_strict_replay_catches_branching_on_the_random_module() -> None:
    @workflow("driver.dice")
    async def dice() -> Any:
        first = await coda.context.spawn_task(double, {"n": 1})
        if random.random() < 0.5:  # a determinism bug
            return await coda.context.spawn_task(double, {"n": first})
        return await coda.context.spawn_task(where)

    random.seed(20241204)
    caught = []
    for _ in range(5):
        try:
            run(dice)
        except NondeterminismError as exc:
            caught.append((exc, JOURNAL[-1].events["r"][-1]))
    assert caught, "five runs never noticed the random branch"
    error, last = caught[0]
    assert error.index == 1
    assert {error.recorded, error.produced} == {
        "task 'driver.double'",
        "task 'driver.where'",
    }
    # Parked in the journal, not left running (unless the live run had already
    # completed when the replay diverged).
    assert isinstance(last, (ev.RunParked, ev.RunCompleted))


def test_strict_replay_catches_branching_on_the_wall_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ticks = iter(range(1_000_000))
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0 + next(ticks))

    @workflow("driver.clocked")
    async def clocked() -> Any:
        first = await coda.context.spawn_task(double, {"n": 1})
        if int(time.time()) % 2 == 0:  # a determinism bug
            return await coda.context.spawn_task(double, {"n": first})
        return await coda.context.spawn_task(where)

    with pytest.raises(NondeterminismError) as info:
        run(clocked, clock=lambda: 1_000.0)
    assert info.value.index == 1
    assert isinstance(JOURNAL[-1].events["r"][-1], ev.RunParked)


def test_strict_replay_catches_a_step_the_live_run_never_made() -> None:
    # A workflow that makes an extra step only when replaying: the replay asks
    # for something the live run did not, which no divergence check sees.
    @workflow("driver.sneaky")
    async def sneaky() -> Any:
        first = coda.context.spawn_task(double, {"n": 1})
        if coda.context.is_replaying():
            coda.context.spawn_task(double, {"n": 2})
        return await first

    with pytest.raises(NondeterminismError) as info:
        run(sneaky)
    assert info.value.index == 1
    assert info.value.recorded == "nothing more (the live run stopped here)"
    assert info.value.produced == "task 'driver.double' on replay"


def test_without_strict_replay_the_same_code_goes_unnoticed() -> None:
    @workflow("driver.dice2")
    async def dice2() -> Any:
        first = await coda.context.spawn_task(double, {"n": 1})
        if random.random() < 0.5:
            return await coda.context.spawn_task(double, {"n": first})
        return await coda.context.spawn_task(where)

    random.seed(7)
    for _ in range(5):
        assert run(dice2, strict_replay=False) in (4, "thread")


FIXED: dict[str, bool] = {}


@coda.task(name="driver.once", registry=REGISTRY)
async def once() -> str:
    SEEN["once"] = SEEN.get("once", 0) + 1
    return "once"


@coda.task(name="driver.broken", registry=REGISTRY)
async def broken() -> str:
    if not FIXED.get("broken"):
        raise KeyError("not yet")
    return "fixed"


def test_a_failed_run_retried_by_hand_reuses_its_cached_results() -> None:
    @workflow("driver.retried")
    async def retried() -> Any:
        first = await coda.context.spawn_task(once, cache_key=["once"])
        return [first, await coda.context.spawn_task(broken)]

    FIXED.clear()
    runner = runner_for(retried)
    with pytest.raises(RunFailedError):
        asyncio.run(runner.run(retried, run_id="r"))

    FIXED["broken"] = True
    journal = JOURNAL[0]
    state = fold(journal.events["r"])
    assert state is not None
    asyncio.run(journal.append(decide.retry_run(state, "deployed a fix", 5.0)))
    assert asyncio.run(runner.drive("r")) == ["once", "fixed"]
    assert SEEN["once"] == 1
    names = [type(e).__name__ for e in journal.events["r"]]
    assert names[names.index("RunRetried") :] == [
        "RunRetried",
        "AttemptStarted",
        "TaskReused",
        "TaskScheduled",
        "TaskStarted",
        "TaskCompleted",
        "RunCompleted",
    ]
