"""Tests for coda.replay.loop: the deterministic event loop."""

from __future__ import annotations

import asyncio
import gc
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import coda
from coda import decide
from coda.journal import events as ev
from coda.replay.engine import CompleteRun, ScheduleTask, WorkflowInstance
from coda.replay.loop import DeterministicLoop, TimersNotAllowed
from coda.state import StepStatus

# A small concurrent program of the kind workflow code is: tasks that wait on
# outside results (the futures stand for task steps), gather, wait, nested
# tasks. Everything it does is logged in the order it happens.


def program(
    loop: DeterministicLoop, futures: list[asyncio.Future[Any]], log: list[Any]
):
    async def chain(name: str, steps: list[int]) -> str:
        for index in steps:
            value = await futures[index]
            log.append((name, index, value))
            await asyncio.sleep(0)  # a plain yield is allowed
        return name

    async def racer() -> None:
        first = asyncio.ensure_future(chain("r1", [4]))
        second = asyncio.ensure_future(chain("r2", [5]))
        done, pending = await asyncio.wait(
            [first, second], return_when=asyncio.FIRST_COMPLETED
        )
        log.append(("race won by", sorted(t.result() for t in done)))
        await asyncio.gather(*pending)

    async def main() -> None:
        inner = asyncio.gather(chain("a", [0, 3]), chain("b", [1]), racer())
        results = await asyncio.gather(inner, chain("c", [2, 6, 7]))
        log.append(("done", results))

    return loop.create_task(main())


def run_with(order: list[int]) -> list[Any]:
    """Run the program, resolving its futures in `order`; return its log."""
    loop = DeterministicLoop()
    futures = [loop.create_future() for _ in range(8)]
    log: list[Any] = []
    main = program(loop, futures, log)
    loop.run_until_quiet()
    for index in order:
        futures[index].set_result(index * 10)
        log.append(("resolved", index))
        loop.run_until_quiet()
    assert main.done()
    main.result()
    return log


def seeded_order(seed: int) -> list[int]:
    order = list(range(8))
    random.Random(seed).shuffle(order)
    return order


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_same_resolutions_same_order(seed: int) -> None:
    order = seeded_order(seed)
    assert run_with(order) == run_with(order)


def test_the_order_follows_the_resolutions_and_nothing_else() -> None:
    # Different resolution orders do give different interleavings (so the test
    # above is not comparing constants), and each is exactly reproducible.
    logs = {repr(run_with(seeded_order(seed))) for seed in range(20)}
    assert len(logs) > 5
    again = {repr(run_with(seeded_order(seed))) for seed in range(20)}
    assert logs == again


def test_ready_callbacks_run_first_in_first_out() -> None:
    loop = DeterministicLoop()
    seen: list[int] = []
    for i in range(5):
        loop.call_soon(seen.append, i)
    handle = loop.call_soon(seen.append, 99)
    handle.cancel()
    loop.call_soon(lambda: loop.call_soon(seen.append, 6))
    loop.run_until_quiet()
    assert seen == [0, 1, 2, 3, 4, 6]


def test_wall_clock_timers_are_refused() -> None:
    assert issubclass(TimersNotAllowed, coda.CodaError)
    assert issubclass(TimersNotAllowed, RuntimeError)
    loop = DeterministicLoop()
    with pytest.raises(TimersNotAllowed, match="cannot wait on the wall clock"):
        loop.call_later(1.0, print)
    with pytest.raises(TimersNotAllowed):
        loop.call_at(5.0, print)

    outcomes: dict[str, Any] = {}

    async def sleeper(delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            outcomes[str(delay)] = "slept"
        except TimersNotAllowed as exc:
            outcomes[str(delay)] = exc

    async def timeout() -> None:
        try:
            await asyncio.wait_for(loop.create_future(), timeout=5)
        except TimersNotAllowed as exc:
            outcomes["wait_for"] = exc

    for coro in (sleeper(0), sleeper(0.5), timeout()):
        loop.create_task(coro)
    loop.run_until_quiet()
    assert outcomes["0"] == "slept"
    assert isinstance(outcomes["0.5"], TimersNotAllowed)
    assert isinstance(outcomes["wait_for"], TimersNotAllowed)


def test_it_is_the_running_loop_only_while_it_runs() -> None:
    async def outer() -> None:
        real = asyncio.get_running_loop()
        loop = DeterministicLoop()
        seen: list[Any] = []

        async def inside() -> None:
            seen.append(asyncio.get_running_loop())

        loop.create_task(inside())
        assert not loop.is_running()
        loop.run_until_quiet()
        assert seen == [loop]
        assert asyncio.get_running_loop() is real
        assert not loop.is_running()

    asyncio.run(outer())


def test_a_failing_callback_is_kept_and_the_rest_still_runs() -> None:
    loop = DeterministicLoop()
    seen: list[int] = []
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(seen.append, 1)
    loop.run_until_quiet()
    assert seen == [1]
    assert isinstance(loop.errors[0]["exception"], ZeroDivisionError)
    assert asyncio._get_running_loop() is None
    assert not loop.is_running()


def test_unretrieved_exceptions_are_kept_not_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    loop = DeterministicLoop()

    async def fails() -> None:
        raise ValueError("lost")

    task = loop.create_task(fails())
    loop.run_until_quiet()
    del task
    gc.collect()
    assert len(loop.errors) == 1
    assert isinstance(loop.errors[0]["exception"], ValueError)
    assert capsys.readouterr().err == ""


def test_close_drops_what_was_ready() -> None:
    loop = DeterministicLoop()
    seen: list[int] = []
    loop.call_soon(seen.append, 1)
    loop.close()
    assert loop.is_closed()
    loop.run_until_quiet()
    assert seen == []


# The same through the engine: a workflow instance fed task results in an
# order a seeded scheduler picks, with nothing but the pure core involved.

_FANOUT_TASKS = coda.Registry()


@coda.task(name="loop.item", registry=_FANOUT_TASKS)
async def item(i: int, depth: int) -> int:
    return i * 10 + depth


@coda.workflow(name="loop.fan_out", registry=_FANOUT_TASKS)
async def fan_out(width: int) -> Any:
    async def branch(i: int) -> list[int]:
        # Each branch's later steps are made when its earlier results arrive,
        # so the step numbering depends on the order results are delivered.
        out = []
        for depth in range(3):
            out.append(await coda.context.spawn_task(item, {"i": i, "depth": depth}))
        return out

    return await asyncio.gather(*(branch(i) for i in range(width)))


def drive_seeded(seed: int, feed_own: bool = False) -> tuple[list[Any], list[ev.Event]]:
    """Drive `fan_out` by hand, delivering results in an order `seed` picks.

    With `feed_own`, the instance is also fed the events made from its own
    commands (as a worker that relays every event would); it must not care.
    """
    rng = random.Random(seed)
    state, history = decide.new_run(
        "r", fan_out.name, {"width": 3}, fan_out.policy, 0.0
    )
    instance = WorkflowInstance(fan_out, "r", {"width": 3})
    made: list[Any] = []
    commands = instance.activate(history)
    while True:
        made += commands
        new = decide.on_commands(state, commands, 0.0)
        if state.status.finished:
            return made, history + new
        for step in decide.due_steps(state, 0.0):
            new += decide.start_task(state, step, "w", 0.0)
        running = [s for s in state.steps.values() if s.status is StepStatus.STARTED]
        chosen = rng.choice(running)
        result = asyncio.run(item.fn(**chosen.args))
        new += decide.on_task_result(
            state, chosen.attempt, chosen.step, chosen.try_number, result, 0.0
        )
        history += new
        commands = instance.activate(new if feed_own else new[-1:])


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_the_engine_is_deterministic_under_a_seeded_scheduler(seed: int) -> None:
    made, history = drive_seeded(seed)
    assert drive_seeded(seed) == (made, history)
    assert drive_seeded(seed, feed_own=True) == (made, history)
    assert isinstance(made[-1], CompleteRun)
    assert made[-1].result == [[i * 10 + d for d in range(3)] for i in range(3)]
    # The history replays on a fresh instance with nothing left to do.
    _, commands = WorkflowInstance.from_history(fan_out, history)
    assert commands == []


def test_the_seeded_scheduler_really_reorders_steps() -> None:
    orders = {
        tuple(
            (c.args["i"], c.args["depth"])
            for c in drive_seeded(seed)[0]
            if isinstance(c, ScheduleTask)
        )
        for seed in range(10)
    }
    assert len(orders) > 3
