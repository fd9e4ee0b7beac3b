"""Tests for coda.replay.engine: replay, divergence, attempts, retries, values.

Runs are made with `LocalRunner` on a `MemoryJournal`, with a fake clock and
fixed side-effect values, and replayed with `WorkflowInstance.from_history`:
the pure entry point a worker or a unit test uses.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import coda
from coda.definitions import WorkflowDef
from coda.errors import (
    CodaError,
    NondeterminismError,
    RunFailedError,
    TaskError,
    ValueNotJSON,
    ValueTooLarge,
)
from coda.journal import events as ev
from coda.journal.memory import MemoryJournal
from coda.replay.engine import (
    CompleteRun,
    RecordSideEffect,
    ScheduleTask,
    WorkflowInstance,
    current_instance,
)

TASKS = coda.Registry()
CALLS: collections.Counter[str] = collections.Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


@coda.task(name="engine.echo", registry=TASKS)
async def echo(value: Any) -> Any:
    CALLS["echo"] += 1
    return value


@coda.task(name="engine.other", registry=TASKS)
def other(value: Any) -> Any:  # a plain def: runs in a thread
    CALLS["other"] += 1
    return ["other", value]


@coda.task(name="engine.lookup", registry=TASKS)
async def lookup(key: str) -> Any:
    CALLS["lookup"] += 1
    return {"known": 1}[key]


@coda.task(
    name="engine.flaky",
    registry=TASKS,
    retry_on=[OSError],
    max_retries=2,
    backoff=0.01,
    backoff_factor=3.0,
)
async def flaky(fail_times: int, error: str = "refused") -> str:
    CALLS["flaky"] += 1
    if CALLS["flaky"] <= fail_times:
        if error == "refused":
            raise ConnectionRefusedError("port closed")  # an OSError subclass
        raise ValueError("not retried")
    return f"ok after {CALLS['flaky']}"


@coda.task(
    name="engine.capped",
    registry=TASKS,
    max_retries=3,
    backoff=1.0,
    backoff_factor=10.0,
    max_backoff=5.0,
)
async def capped() -> None:
    CALLS["capped"] += 1
    raise RuntimeError("always")


@coda.task(name="engine.slow_echo", registry=TASKS)
async def slow_echo(value: Any) -> Any:
    await asyncio.sleep(0.05)
    CALLS["slow_echo"] += 1
    return value


@coda.task(name="engine.bad_result", registry=TASKS)
async def bad_result() -> Any:
    return {"when": datetime.date(2024, 1, 1)}


class Clock:
    """A clock that moves by `tick` at every reading.

    The driver sleeps (for real) until the next backoff ends by this clock, so
    a large tick makes every backoff end at once.
    """

    def __init__(self, tick: float = 0.001) -> None:
        self.now = 1_000.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


class Source:
    """Side-effect values that are easy to recognise."""

    def __init__(self, base: int = 0) -> None:
        self.n = base

    def now(self) -> float:
        self.n += 1
        return 1_700_000_000.0 + self.n

    def uuid4(self) -> str:
        self.n += 1
        return str(uuid.UUID(int=self.n))

    def random(self) -> float:
        self.n += 1
        return self.n / 1000


class NoSource:
    """A replay must never ask for a fresh value."""

    def now(self) -> float:
        raise AssertionError("replay asked for a fresh now()")

    def uuid4(self) -> str:
        raise AssertionError("replay asked for a fresh uuid4()")

    def random(self) -> float:
        raise AssertionError("replay asked for a fresh random()")


def workflow(name: str, **policy: Any) -> Callable[[Any], WorkflowDef[..., Any]]:
    """Declare a workflow outside any shared registry (versions share names)."""

    def wrap(fn: Any) -> WorkflowDef[..., Any]:
        return coda.workflow(name=name, registry=coda.Registry(), **policy)(fn)

    return wrap


def registry_of(*workflows: WorkflowDef[..., Any]) -> coda.Registry:
    registry = coda.Registry(tasks=dict(TASKS.tasks))
    for definition in workflows:
        registry.add_workflow(definition)
    return registry


def run(
    definition: WorkflowDef[..., Any],
    args: dict[str, Any] | None = None,
    journal: MemoryJournal | None = None,
    **options: Any,
) -> tuple[Any, list[ev.Event]]:
    """Run to the end; return the result (or the exception) and the history."""
    journal = journal or MemoryJournal()
    options.setdefault("side_effects", Source())
    options.setdefault("clock", Clock())
    runner = coda.LocalRunner(journal, registry_of(definition), **options)

    async def go() -> Any:
        try:
            return await runner.run(definition, args, run_id="r")
        except CodaError as exc:
            return exc

    outcome = asyncio.run(go())
    return outcome, journal.events.get("r", [])


def kinds(history: list[ev.Event]) -> list[str]:
    return [type(e).__name__ for e in history]


def steps(history: list[ev.Event]) -> list[tuple[Any, ...]]:
    """The step records: (attempt, step, what)."""
    out: list[tuple[Any, ...]] = []
    for e in history:
        if isinstance(e, ev.TaskScheduled):
            out.append((e.attempt, e.step, "task", e.task, e.cache_key))
        elif isinstance(e, ev.TaskReused):
            out.append((e.attempt, e.step, "reused", e.task, e.cache_key))
        elif isinstance(e, ev.SideEffectRecorded):
            out.append((e.attempt, e.step, e.kind, e.value))
    return out


def diverges(
    definition: WorkflowDef[..., Any], history: list[ev.Event]
) -> NondeterminismError:
    with pytest.raises(NondeterminismError) as info:
        WorkflowInstance.from_history(definition, history, side_effects=NoSource())
    return info.value


# A recorded run replays exactly.


@workflow("engine.pipeline")
async def pipeline(x: int) -> Any:
    stamp = coda.context.now()
    first = await coda.context.spawn_task(echo, {"value": x}, cache_key=["e", x])
    both = await asyncio.gather(
        coda.context.spawn_task(other, {"value": first}),
        coda.context.spawn_task(echo, {"value": first + 1}),
    )
    return {
        "both": both,
        "id": str(coda.context.uuid4()),
        "r": coda.context.random(),
        "t": stamp.isoformat(),
    }


def test_a_finished_run_replays_with_nothing_to_do() -> None:
    result, history = run(pipeline, {"x": 3})
    assert result == {
        "both": [["other", 3], 4],
        "id": str(uuid.UUID(int=2)),
        "r": 0.003,
        "t": "2023-11-14T22:13:21+00:00",
    }
    assert kinds(history)[-1] == "RunCompleted"
    instance, commands = WorkflowInstance.from_history(
        pipeline, history, side_effects=NoSource()
    )
    assert commands == []
    assert instance.finished


def test_every_prefix_of_a_history_asks_for_what_the_run_did_next() -> None:
    _, history = run(pipeline, {"x": 3})
    step_kinds = (ev.TaskScheduled, ev.SideEffectRecorded)
    recorded = {(e.attempt, e.step): e for e in history if isinstance(e, step_kinds)}
    asked = set()
    for cut in range(2, len(history)):
        prefix = history[:cut]
        made = {(e.attempt, e.step) for e in prefix if isinstance(e, step_kinds)}
        _, commands = WorkflowInstance.from_history(
            pipeline, prefix, side_effects=Source(base=100)
        )
        for command in commands:
            if isinstance(command, CompleteRun):
                if set(recorded) <= made:  # no fresh side-effect values
                    assert command.result == history[-1].result  # type: ignore[attr-defined]
                continue
            # A step the prefix lacks, and the one the live run made there.
            key = (command.attempt, command.step)
            assert key not in made
            asked.add(key)
            event = recorded[key]
            if isinstance(command, ScheduleTask):
                assert isinstance(event, ev.TaskScheduled)
                assert (command.task, command.args, command.cache_key) == (
                    event.task,
                    event.args,
                    event.cache_key,
                )
            else:
                assert isinstance(command, RecordSideEffect)
                assert isinstance(event, ev.SideEffectRecorded)
                assert command.kind == event.kind
    assert asked == set(recorded)


def test_side_effects_replay_their_recorded_values() -> None:
    result, history = run(pipeline, {"x": 3})
    recorded = [e for e in history if isinstance(e, ev.SideEffectRecorded)]
    assert [(e.kind, e.value) for e in recorded] == [
        ("now", 1_700_000_001.0),
        ("uuid4", str(uuid.UUID(int=2))),
        ("random", 0.003),
    ]
    # Driving the run again from its submission with another source: every
    # value still comes from the history.
    journal = MemoryJournal()
    asyncio.run(journal.append(history[:-1]))  # all but RunCompleted
    runner = coda.LocalRunner(
        journal, registry_of(pipeline), clock=Clock(), side_effects=Source(base=500)
    )
    assert asyncio.run(runner.drive("r")) == result


def test_side_effects_are_typed_and_recorded_as_json() -> None:
    seen: dict[str, Any] = {}

    @workflow("engine.effects")
    async def effects() -> None:
        seen["now"] = coda.context.now()
        seen["uuid"] = coda.context.uuid4()
        seen["random"] = coda.context.random()
        seen["replaying"] = coda.context.is_replaying()
        seen["run_id"] = coda.context.run_id()
        seen["attempt"] = coda.context.attempt()

    run(effects, side_effects=Source(), strict_replay=False)
    assert seen["now"] == datetime.datetime.fromtimestamp(1_700_000_001, datetime.UTC)
    assert seen["uuid"] == uuid.UUID(int=2)
    assert seen["random"] == 0.003
    assert (seen["run_id"], seen["attempt"], seen["replaying"]) == ("r", 1, False)


def test_context_outside_workflow_code_is_refused() -> None:
    with pytest.raises(CodaError, match="only available inside workflow code"):
        coda.context.now()
    with pytest.raises(CodaError):
        coda.context.spawn_task(echo, {"value": 1})


# Divergence: what the code does now against what the history recorded.


@workflow("engine.two_steps")
async def two_steps_v1() -> Any:
    a = await coda.context.spawn_task(echo, {"value": 1}, cache_key=["k", 1])
    b = await coda.context.spawn_task(other, {"value": 2})
    return [a, b]


def v1_history(unfinished: bool = False) -> list[ev.Event]:
    _, history = run(two_steps_v1)
    assert kinds(history)[-1] == "RunCompleted"
    return history[:-1] if unfinished else history


def test_divergence_when_the_task_order_changed() -> None:
    @workflow("engine.two_steps")
    async def swapped() -> Any:
        b = await coda.context.spawn_task(other, {"value": 2})
        a = await coda.context.spawn_task(echo, {"value": 1}, cache_key=["k", 1])
        return [a, b]

    error = diverges(swapped, v1_history())
    assert (error.run_id, error.attempt, error.index) == ("r", 1, 0)
    assert error.recorded == "task 'engine.echo' with cache_key ['k', 1]"
    assert error.produced == "task 'engine.other'"
    assert "diverged from its history at step 0" in str(error)
    assert "history has task 'engine.echo'" in str(error)
    assert "the code now produced task 'engine.other'" in str(error)


def test_divergence_when_a_task_name_changed() -> None:
    @workflow("engine.two_steps")
    async def renamed() -> Any:
        a = await coda.context.spawn_task(echo, {"value": 1}, cache_key=["k", 1])
        b = await coda.context.spawn_task(echo, {"value": 2})
        return [a, b]

    error = diverges(renamed, v1_history())
    assert (error.index, error.recorded, error.produced) == (
        1,
        "task 'engine.other'",
        "task 'engine.echo'",
    )


def test_divergence_when_a_cache_key_changed() -> None:
    @workflow("engine.two_steps")
    async def rekeyed() -> Any:
        a = await coda.context.spawn_task(echo, {"value": 1}, cache_key=["k", 2])
        b = await coda.context.spawn_task(other, {"value": 2})
        return [a, b]

    error = diverges(rekeyed, v1_history())
    assert (error.index, error.recorded, error.produced) == (
        0,
        "task 'engine.echo' with cache_key ['k', 1]",
        "task 'engine.echo' with cache_key ['k', 2]",
    )


def test_changed_task_args_are_not_a_divergence() -> None:
    # Steps match on kind, task name and cache key; arguments may change (a
    # fixed bug in how they are computed must not park every run).
    @workflow("engine.two_steps")
    async def new_args() -> Any:
        a = await coda.context.spawn_task(echo, {"value": 10}, cache_key=["k", 1])
        b = await coda.context.spawn_task(other, {"value": 20})
        return [a, b]

    _, commands = WorkflowInstance.from_history(new_args, v1_history())
    assert commands == []


def test_divergence_when_a_side_effect_is_where_a_task_was() -> None:
    @workflow("engine.two_steps")
    async def clock_first() -> Any:
        coda.context.now()
        a = await coda.context.spawn_task(echo, {"value": 1}, cache_key=["k", 1])
        return a

    error = diverges(clock_first, v1_history())
    assert (error.index, error.recorded, error.produced) == (
        0,
        "task 'engine.echo' with cache_key ['k', 1]",
        "side effect now()",
    )


def test_divergence_when_the_code_makes_fewer_steps_than_history() -> None:
    @workflow("engine.two_steps")
    async def shorter() -> Any:
        return await coda.context.spawn_task(echo, {"value": 1}, cache_key=["k", 1])

    history = v1_history()
    error = diverges(shorter, history)
    assert (error.index, error.recorded, error.produced) == (
        1,
        "task 'engine.other' finishing",
        "nothing (the attempt ended)",
    )
    # Cut before the second step finished: the step itself is what is missing.
    cut = kinds(history).index("TaskScheduled", 3) + 1
    error = diverges(shorter, history[:cut])
    assert (error.index, error.recorded, error.produced) == (
        1,
        "task 'engine.other'",
        "nothing",
    )


def test_divergence_when_the_code_makes_more_steps_than_history() -> None:
    @workflow("engine.two_steps")
    async def longer() -> Any:
        a = await coda.context.spawn_task(echo, {"value": 1}, cache_key=["k", 1])
        b = await coda.context.spawn_task(other, {"value": 2})
        await coda.context.spawn_task(echo, {"value": 3})
        return [a, b]

    error = diverges(longer, v1_history())
    assert (error.index, error.recorded, error.produced) == (
        2,
        "the attempt ending here",
        "task 'engine.echo'",
    )
    # Unfinished, the same history just asks for the new step.
    _, commands = WorkflowInstance.from_history(longer, v1_history(unfinished=True))
    assert [type(c) for c in commands] == [ScheduleTask]


def test_divergence_when_the_code_now_completes_where_history_failed() -> None:
    @workflow("engine.fails")
    async def fails_v1() -> Any:
        return await coda.context.spawn_task(lookup, {"key": "missing"})

    @workflow("engine.fails")
    async def fixed() -> Any:
        try:
            return await coda.context.spawn_task(lookup, {"key": "missing"})
        except TaskError:
            return None

    outcome, history = run(fails_v1)
    assert isinstance(outcome, RunFailedError)
    assert kinds(history)[-2:] == ["AttemptFailed", "RunFailed"]
    error = diverges(fixed, history)
    assert (error.index, error.recorded, error.produced) == (
        1,
        "the attempt failed with coda.errors.TaskError",
        "the attempt completed",
    )
    # And the other way round.
    _, history = run(fixed)
    error = diverges(fails_v1, history)
    assert (error.recorded, error.produced) == (
        "the attempt completed",
        "the attempt failed",
    )


def test_a_live_divergence_parks_the_run_and_fixed_code_resumes_it() -> None:
    @workflow("engine.two_steps")
    async def swapped() -> Any:
        b = await coda.context.spawn_task(other, {"value": 2})
        a = await coda.context.spawn_task(echo, {"value": 1}, cache_key=["k", 1])
        return [a, b]

    history = v1_history(unfinished=True)
    journal = MemoryJournal()
    asyncio.run(journal.append(history))

    async def drive(definition: WorkflowDef[..., Any]) -> Any:
        runner = coda.LocalRunner(journal, registry_of(definition), clock=Clock())
        return await runner.drive("r")

    with pytest.raises(NondeterminismError) as info:
        asyncio.run(drive(swapped))
    assert info.value.index == 0
    parked = journal.events["r"][-1]
    assert isinstance(parked, ev.RunParked)
    assert parked.error.type == "coda.errors.NondeterminismError"
    assert asyncio.run(journal.run("r")).status == "parked"

    assert asyncio.run(drive(two_steps_v1)) == [1, ["other", 2]]
    assert kinds(journal.events["r"])[-2:] == ["RunResumed", "RunCompleted"]


# Gather and ordering.


def test_gather_order_is_deterministic() -> None:
    @workflow("engine.fan_out")
    async def fan_out(n: int) -> Any:
        async def branch(i: int) -> Any:
            first = await coda.context.spawn_task(echo, {"value": i})
            second = await coda.context.spawn_task(other, {"value": first})
            return second

        return await asyncio.gather(*(branch(i) for i in range(n)))

    results = [run(fan_out, {"n": 4}) for _ in range(3)]
    expected = [["other", i] for i in range(4)]
    assert all(result == expected for result, _ in results)
    first_steps = steps(results[0][1])
    assert all(steps(history) == first_steps for _, history in results)
    # The branches start in order, so their first tasks are steps 0 to 3.
    assert [s[3] for s in first_steps[:4]] == ["engine.echo"] * 4
    _, commands = WorkflowInstance.from_history(fan_out, results[0][1])
    assert commands == []


# Task failures, retries and TaskError.


def test_task_error_carries_the_remote_type_message_and_traceback() -> None:
    caught: dict[str, Any] = {}

    @workflow("engine.catches")
    async def catches() -> str:
        try:
            await coda.context.spawn_task(lookup, {"key": "missing"})
        except TaskError as exc:
            caught["error"] = exc
        return "handled"

    result, history = run(catches)
    assert result == "handled"
    error = caught["error"]
    assert (error.task, error.remote_type, error.remote_message) == (
        "engine.lookup",
        "KeyError",
        "'missing'",
    )
    assert "in lookup" in error.remote_traceback
    assert "KeyError: 'missing'" in error.remote_traceback
    assert error.remote_types[:2] == ("KeyError", "LookupError")
    assert str(error) == "task engine.lookup failed: KeyError: 'missing'"

    # Replayed, the workflow sees the same TaskError from the history.
    caught.clear()
    _, commands = WorkflowInstance.from_history(catches, history)
    assert commands == []
    assert caught["error"].remote_traceback == error.remote_traceback


def test_an_uncaught_task_error_fails_the_run_with_the_remote_traceback() -> None:
    @workflow("engine.uncaught")
    async def uncaught() -> None:
        await coda.context.spawn_task(lookup, {"key": "missing"})

    outcome, history = run(uncaught)
    assert isinstance(outcome, RunFailedError)
    assert outcome.error_type == "coda.errors.TaskError"
    assert "Remote traceback of task engine.lookup" in outcome.traceback
    assert "in lookup" in outcome.traceback
    failed = [e for e in history if isinstance(e, ev.RunFailed)]
    assert failed[0].error.message == "task engine.lookup failed: KeyError: 'missing'"


def test_task_retries_follow_the_policy_before_the_workflow_sees_anything() -> None:
    @workflow("engine.retries")
    async def retries(fail_times: int, error: str) -> Any:
        try:
            return await coda.context.spawn_task(
                flaky, {"fail_times": fail_times, "error": error}
            )
        except TaskError as exc:
            return ["failed", exc.remote_type, CALLS["flaky"]]

    # Two failures of a subclass of OSError (retry_on=[OSError]), then success.
    result, history = run(retries, {"fail_times": 2, "error": "refused"})
    assert result == "ok after 3"
    failures = [e for e in history if isinstance(e, ev.TaskFailed)]
    assert [f.try_number for f in failures] == [1, 2]
    assert all(f.error.type == "ConnectionRefusedError" for f in failures)
    # Backoff: 0.01, then 0.01 * 3.
    delays = [round(f.retry_at - f.at, 9) for f in failures]
    assert delays == [0.01, 0.03]
    started = [e.try_number for e in history if isinstance(e, ev.TaskStarted)]
    assert started == [1, 2, 3]

    # Three failures exhaust max_retries=2: the workflow sees one TaskError.
    CALLS.clear()
    result, history = run(retries, {"fail_times": 5, "error": "refused"})
    assert result == ["failed", "ConnectionRefusedError", 3]
    failures = [e for e in history if isinstance(e, ev.TaskFailed)]
    assert [f.retry_at is None for f in failures] == [False, False, True]

    # A failure outside retry_on is not retried at all.
    CALLS.clear()
    result, history = run(retries, {"fail_times": 5, "error": "value"})
    assert result == ["failed", "ValueError", 1]
    assert kinds(history).count("TaskStarted") == 1


def test_backoff_is_capped() -> None:
    @workflow("engine.capped_wf")
    async def capped_wf() -> None:
        await coda.context.spawn_task(capped)

    outcome, history = run(capped_wf, clock=Clock(tick=100.0))
    assert isinstance(outcome, RunFailedError)
    failures = [e for e in history if isinstance(e, ev.TaskFailed)]
    delays = [round(f.retry_at - f.at, 9) for f in failures if f.retry_at]
    assert delays == [1.0, 5.0, 5.0]  # 1, 10 capped to 5, 100 capped to 5
    assert CALLS["capped"] == 4


# Workflow attempts and cache keys.


def test_a_new_attempt_reuses_cached_results_and_reruns_the_rest() -> None:
    @workflow("engine.attempts", max_retries=2, backoff=0.005)
    async def attempts() -> Any:
        cached = await coda.context.spawn_task(echo, {"value": "c"}, cache_key=["c"])
        fresh = await coda.context.spawn_task(other, {"value": "f"})
        if coda.context.attempt() < 3:
            raise RuntimeError(f"attempt {coda.context.attempt()} fails")
        return [cached, fresh]

    result, history = run(attempts)
    assert result == ["c", ["other", "f"]]
    assert steps(history) == [
        (1, 0, "task", "engine.echo", ["c"]),
        (1, 1, "task", "engine.other", None),
        (2, 0, "reused", "engine.echo", ["c"]),
        (2, 1, "task", "engine.other", None),
        (3, 0, "reused", "engine.echo", ["c"]),
        (3, 1, "task", "engine.other", None),
    ]
    reused = [e for e in history if isinstance(e, ev.TaskReused)]
    assert [(e.from_attempt, e.result) for e in reused] == [(1, "c"), (1, "c")]
    assert (CALLS["echo"], CALLS["other"]) == (1, 3)
    failed = [e for e in history if isinstance(e, ev.AttemptFailed)]
    assert [round(e.retry_at - e.at, 9) for e in failed] == [0.005, 0.01]
    assert [e.error.message for e in failed] == ["attempt 1 fails", "attempt 2 fails"]

    _, commands = WorkflowInstance.from_history(attempts, history)
    assert commands == []


def test_workflow_retries_respect_retry_on_and_max_retries() -> None:
    @workflow("engine.picky", max_retries=5, retry_on=[KeyError], backoff=0.001)
    async def picky() -> None:
        raise ValueError("not a KeyError")

    outcome, history = run(picky)
    assert isinstance(outcome, RunFailedError)
    assert kinds(history).count("AttemptStarted") == 1

    @workflow("engine.limited", max_retries=2, backoff=0.001)
    async def limited() -> None:
        raise ValueError("always")

    outcome, history = run(limited)
    assert isinstance(outcome, RunFailedError)
    assert kinds(history).count("AttemptStarted") == 3
    assert kinds(history)[-2:] == ["AttemptFailed", "RunFailed"]


def test_a_task_finishing_after_its_attempt_failed_still_fills_the_cache() -> None:
    @workflow("engine.late", max_retries=1, backoff=0.3)
    async def late() -> Any:
        slow = coda.context.spawn_task(slow_echo, {"value": "s"}, cache_key=["slow"])
        if coda.context.attempt() == 1:
            await coda.context.spawn_task(lookup, {"key": "missing"})
        return await slow

    # Real time here: what is tested is a task outliving its attempt.
    result, history = run(late, clock=time.time)
    assert result == "s"
    # The slow task of attempt 1 finished while the run waited for attempt 2.
    order = kinds(history)
    assert order.index("AttemptFailed") < order.index("TaskCompleted")
    assert steps(history)[-1] == (2, 0, "reused", "engine.slow_echo", ["slow"])
    assert CALLS["slow_echo"] == 1


# Values: refused where they are produced, before anything is written.


def test_non_json_task_args_are_refused_before_anything_is_written() -> None:
    messages: list[str] = []

    @workflow("engine.bad_args")
    async def bad_args() -> Any:
        try:
            coda.context.spawn_task(
                echo,
                {"value": {"event_data": {"received": datetime.datetime(2024, 1, 1)}}},
            )
        except ValueNotJSON as exc:
            messages.append(str(exc))
        return await coda.context.spawn_task(echo, {"value": "fine"})

    result, history = run(bad_args)
    assert result == "fine"
    assert messages[0].startswith(
        'args of task engine.echo["value"]["event_data"]["received"]: '
        "datetime is not a JSON value"
    )
    # The refused spawn took no step: the next task is step 0.
    assert steps(history) == [(1, 0, "task", "engine.echo", None)]


def test_an_uncaught_refusal_fails_the_attempt_with_nothing_scheduled() -> None:
    @workflow("engine.bad_key")
    async def bad_key() -> None:
        await coda.context.spawn_task(echo, {"value": 1}, cache_key=[(1, 2)])

    outcome, history = run(bad_key)
    assert isinstance(outcome, RunFailedError)
    assert outcome.error_type == "coda.errors.ValueNotJSON"
    assert "cache_key of task engine.echo[0]: tuple" in str(outcome)
    assert steps(history) == []


def test_a_submission_with_non_json_args_writes_nothing() -> None:
    journal = MemoryJournal()
    runner = coda.LocalRunner(journal, registry_of(pipeline), clock=Clock())
    with pytest.raises(ValueNotJSON, match=r'args of workflow engine.pipeline\["x"\]'):
        asyncio.run(runner.submit(pipeline, {"x": {1, 2}}))
    assert journal.events == {}


def test_values_over_the_size_limit_are_refused_with_the_limit_named() -> None:
    journal = MemoryJournal()
    runner = coda.LocalRunner(
        journal, registry_of(pipeline), clock=Clock(), max_value_bytes=100
    )
    with pytest.raises(ValueTooLarge, match="over the limit of 100 bytes"):
        asyncio.run(runner.submit(pipeline, {"x": "x" * 200}))
    assert journal.events == {}

    @workflow("engine.big_args")
    async def big_args() -> None:
        await coda.context.spawn_task(echo, {"value": "x" * 200})

    outcome, history = run(big_args, max_value_bytes=100)
    assert isinstance(outcome, RunFailedError)
    assert outcome.error_type == "coda.errors.ValueTooLarge"
    assert "args of task engine.echo: " in str(outcome)
    assert steps(history) == []

    @workflow("engine.big_result")
    async def big_result() -> str:
        return "x" * 200

    outcome, _ = run(big_result, max_value_bytes=100)
    assert isinstance(outcome, RunFailedError)
    assert outcome.error_type == "coda.errors.ValueTooLarge"


def test_empty_values_are_checked_too_when_they_might_not_fit() -> None:
    # No arguments and no result are the common case, and are not checked in
    # full: an empty dict of a subclass, or a limit too small even for them,
    # must still be refused.
    @workflow("engine.ordered_args")
    async def ordered_args() -> None:
        # Straight to the engine: `coda.context.spawn_task` takes any empty
        # args for none.
        instance = current_instance()
        await instance.spawn_task(echo, collections.OrderedDict(), None)

    outcome, history = run(ordered_args)
    assert isinstance(outcome, RunFailedError)
    assert "args of task engine.echo: OrderedDict is not a JSON value" in str(outcome)
    assert steps(history) == []

    @workflow("engine.nothing")
    async def nothing() -> None:
        return None

    outcome, _ = run(nothing, max_value_bytes=3)
    assert isinstance(outcome, RunFailedError)
    assert outcome.error_type == "coda.errors.ValueTooLarge"
    result, _ = run(nothing, max_value_bytes=4)
    assert result is None


def test_non_json_results_fail_the_task_or_the_attempt() -> None:
    @workflow("engine.bad_task_result")
    async def bad_task_result() -> Any:
        try:
            return await coda.context.spawn_task(bad_result)
        except TaskError as exc:
            return [exc.remote_type, exc.remote_message]

    result, _ = run(bad_task_result)
    assert result == [
        "coda.errors.ValueNotJSON",
        'result of task engine.bad_result["when"]: date is not a JSON value '
        "(pass item.isoformat())",
    ]

    @workflow("engine.bad_wf_result")
    async def bad_wf_result() -> Any:
        return (1, 2)

    outcome, _ = run(bad_wf_result)
    assert isinstance(outcome, RunFailedError)
    assert "result of workflow engine.bad_wf_result: tuple" in str(outcome)


def test_spawn_task_checks_what_it_is_given() -> None:
    errors: list[str] = []

    @workflow("engine.misuse")
    async def misuse() -> None:
        for call in (
            lambda: coda.context.spawn_task(lambda: 1),  # type: ignore[arg-type]
            lambda: coda.context.spawn_task(echo, [1]),  # type: ignore[arg-type]
            lambda: coda.context.spawn_task(echo, {"value": 1}, cache_key="k"),  # type: ignore[arg-type]
        ):
            try:
                call()
            except TypeError as exc:
                errors.append(str(exc))

    run(misuse, strict_replay=False)
    assert len(errors) == 3
    assert "declared with @coda.task" in errors[0]
    assert "must be a dict" in errors[1]
    assert "must be a list" in errors[2]


# What workflow code may not do.


def test_sleeping_on_the_wall_clock_fails_the_attempt_clearly() -> None:
    @workflow("engine.sleeper")
    async def sleeper() -> None:
        await coda.context.spawn_task(echo, {"value": 1})
        await asyncio.sleep(1)

    outcome, _ = run(sleeper)
    assert isinstance(outcome, RunFailedError)
    assert outcome.error_type == "coda.replay.loop.TimersNotAllowed"
    assert "cannot wait on the wall clock" in str(outcome)
    assert "Do the waiting in a task" in str(outcome)

    @workflow("engine.yielder")
    async def yielder() -> int:
        await asyncio.sleep(0)  # a plain yield is fine
        return 1

    assert run(yielder)[0] == 1


def test_the_workflow_logger_is_quiet_while_replaying(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @workflow("engine.logs")
    async def logs() -> int:
        coda.context.logger.info("starting")
        a, b = (
            coda.context.spawn_task(echo, {"value": 1}),
            coda.context.spawn_task(echo, {"value": 2}),
        )
        first = await a
        coda.context.logger.info("first is %s", first)
        second = await b
        coda.context.logger.info("done with %s", second)
        return first + second

    with caplog.at_level("INFO", logger="coda.workflow"):
        result, history = run(logs)  # strict replay after every activation
    assert result == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "coda.workflow"]
    assert lines == ["[run r] starting", "[run r] first is 1", "[run r] done with 2"]
    assert all(r.run_id == "r" for r in caplog.records if r.name == "coda.workflow")

    caplog.clear()
    with caplog.at_level("INFO", logger="coda.workflow"):
        WorkflowInstance.from_history(logs, history)
    assert [r for r in caplog.records if r.name == "coda.workflow"] == []


def test_strict_replay_is_what_catches_unrecorded_inputs() -> None:
    # The same nondeterministic workflow passes without strict replay (the
    # live instance never looks back) and is caught with it.
    flips = iter([True, False] * 10)

    @workflow("engine.flipper")
    async def flipper() -> Any:
        first = await coda.context.spawn_task(echo, {"value": 1})
        if next(flips):
            return await coda.context.spawn_task(echo, {"value": first})
        return await coda.context.spawn_task(other, {"value": first})

    outcome, history = run(flipper, strict_replay=False)
    assert outcome == 1
    outcome, history = run(flipper)
    assert isinstance(outcome, NondeterminismError)
    assert outcome.index == 1
    assert kinds(history)[-1] == "RunParked"


def test_replay_needs_a_history_that_starts_with_a_submission() -> None:
    with pytest.raises(CodaError, match="starts with the run's RunSubmitted"):
        WorkflowInstance.from_history(pipeline, [])
    _, history = run(pipeline, {"x": 1})
    with pytest.raises(CodaError):
        WorkflowInstance.from_history(pipeline, history[1:])


def test_commands_of_a_fresh_run() -> None:
    submitted = ev.RunSubmitted(
        run_id="r", seq=0, at=1.0, workflow="engine.pipeline", args={"x": 5}
    )
    started = ev.AttemptStarted(run_id="r", seq=1, at=1.0, attempt=1)
    instance, commands = WorkflowInstance.from_history(
        pipeline, [submitted, started], side_effects=Source()
    )
    assert commands == [
        RecordSideEffect(1, 0, "now", 1_700_000_001.0),
        ScheduleTask(1, 1, "engine.echo", {"value": 5}, ["e", 5], echo.policy, None),
    ]
    assert not instance.finished


def test_a_cache_key_reuses_only_a_result_of_the_same_task() -> None:
    @workflow("engine.cache_scope", max_retries=1, backoff=0.01)
    async def flow() -> Any:
        if coda.context.attempt() == 1:
            await coda.context.spawn_task(echo, args={"value": "A"}, cache_key=["k"])
            raise RuntimeError("once more")
        first = await coda.context.spawn_task(
            other, args={"value": "B"}, cache_key=["k"]
        )
        again = await coda.context.spawn_task(
            echo, args={"value": "not run"}, cache_key=["k"]
        )
        return [first, again]

    outcome, history = run(flow)

    # `other` with the key of attempt 1's `echo` runs for real; `echo` with
    # that key is reused.
    assert outcome == [["other", "B"], "A"]
    assert CALLS == {"echo": 1, "other": 1}
    reused = [e for e in history if isinstance(e, ev.TaskReused)]
    assert [(e.task, e.result) for e in reused] == [("engine.echo", "A")]
