"""The order in which due steps start, and the tries waiting on deck.

These drive `Dispatcher` alone: workers are handles whose connection records
what is sent, and the journal is a list of appends that a test commits (runs
their "then") when it chooses, so that what is sent before and after a start
is durable can be looked at.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from coda import decide
from coda.journal.events import Event, RetryPolicy, TaskFailed, TaskStarted
from coda.replay.engine import ScheduleTask
from coda.runtime import dispatch
from coda.runtime.dispatch import Dispatcher
from coda.runtime.pool import WorkerHandle
from coda.runtime.runs import LiveRun, Stats
from coda.state import StepStatus


class Sent:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)


class Pool:
    def __init__(self, names: Iterable[str]) -> None:
        self.workers = [
            WorkerHandle(name, process=None, conn=Sent(), started_at=0.0)  # type: ignore[arg-type]
            for name in names
        ]


class Bench:
    """A dispatcher over `runs`, its appends held until `commit`."""

    def __init__(self, workers: Iterable[str] = ("w1",), limit: int = 2) -> None:
        self.now = 1000.0
        self.runs: dict[str, LiveRun] = {}
        self.pool = Pool(workers)
        self.appends: list[
            tuple[list[Event], Callable[[], None] | None, asyncio.Future[bool]]
        ] = []
        self.recorded: list[Event] = []
        self.dispatcher = Dispatcher(
            self.runs,
            self.pool,  # type: ignore[arg-type]
            Stats(),
            write=self._write,
            record=self._record,
            clock=lambda: self.now,
            max_tries_per_worker=limit,
            default_task_timeout=30.0,
            heartbeat_interval=5.0,
            heartbeat_timeout=30.0,
        )

    def _write(
        self,
        events: list[Event],
        runs: Iterable[LiveRun],
        then: Callable[[], None] | None,
    ) -> asyncio.Future[bool]:
        durable = asyncio.get_running_loop().create_future()
        self.appends.append((events, then, durable))
        return durable

    def _record(self, run: LiveRun, events: list[Event], **_: Any) -> Any:
        run.history += events
        self.recorded += events

    def commit(self) -> list[Event]:
        """Make every append so far durable, in order; the events they held."""
        appends, self.appends = self.appends, []
        events: list[Event] = []
        for batch, then, durable in appends:
            events += batch
            if then is not None:
                then()
            durable.set_result(True)
        return events

    async def fail(self) -> None:
        """Every append so far fails: nothing of it is durable."""
        appends, self.appends = self.appends, []
        for _, _, durable in appends:
            durable.set_result(False)
        await asyncio.sleep(0)  # the futures' callbacks run

    def run(self, run_id: str, submitted_at: float, steps: int = 1) -> LiveRun:
        """A running run with `steps` tasks scheduled (not yet queued)."""
        state, events = decide.new_run(run_id, "wf", {}, RetryPolicy(), submitted_at)
        commands = [
            ScheduleTask(
                attempt=1,
                step=n,
                task=f"{run_id}.t{n}",
                args={"n": n},
                cache_key=None,
                policy=RetryPolicy(),
                timeout=None,
            )
            for n in range(steps)
        ]
        events += decide.on_commands(state, commands, submitted_at)
        live = LiveRun(state, events, durable=len(events))
        self.runs[run_id] = live
        return live

    def queue(self, live: LiveRun, step: int) -> None:
        self.dispatcher.queue(live, live.state.steps[(1, step)])

    def start(self, *runs: LiveRun) -> list[Event]:
        """Queue the first step of each run, pump, commit; what was committed."""
        for live in runs:
            self.queue(live, 0)
        self.dispatcher.pump()
        return self.commit()

    def sent(self, worker: int = 0) -> list[str]:
        """The tasks sent to a worker so far."""
        conn = self.pool.workers[worker].conn
        return [m["task"] for m in conn.sent if m["op"] == "task"]  # type: ignore[attr-defined]

    def outcome(self, task: str, worker: int = 0) -> None:
        """The worker answers the try of `task` it holds with success."""
        handle = self.pool.workers[worker]
        (key,) = [k for k in handle.tries if self._task(k) == task]
        run_id, attempt, step, number = key
        msg = {"op": "outcome", "run": run_id, "attempt": attempt, "step": step}
        self.dispatcher.on_outcome(handle, msg | {"try": number, "ok": True})

    def _task(self, key: tuple[str, int, int, int]) -> str:
        return self.runs[key[0]].state.steps[key[1:3]].task


def _started(events: list[Event]) -> list[tuple[str, int]]:
    return [(e.run_id, e.step) for e in events if isinstance(e, TaskStarted)]


def on_loop(test: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        asyncio.run(test())

    run.__name__ = test.__name__
    return run


@on_loop
async def test_due_steps_start_oldest_run_first_whatever_order_they_came_in() -> None:
    bench = Bench(limit=10)
    young, old, middle = (
        bench.run("y", 3.0),
        bench.run("o", 1.0, steps=2),
        bench.run("m", 2.0),
    )
    # The young run's step came first, the old run's second step last.
    bench.queue(young, 0)
    bench.queue(middle, 0)
    bench.queue(old, 0)
    bench.queue(old, 1)
    bench.dispatcher.pump()
    assert _started(bench.commit()) == [("o", 0), ("o", 1), ("m", 0), ("y", 0)]
    assert bench.sent() == ["o.t0", "o.t1", "m.t0", "y.t0"]


@on_loop
async def test_a_worker_gets_as_many_tries_again_on_deck_sent_as_slots_free() -> None:
    bench = Bench(limit=2)
    runs = [bench.run(f"r{n}", float(n)) for n in range(6)]
    for live in runs:
        bench.queue(live, 0)
    bench.dispatcher.pump()
    # Two running and two on deck; the last two wait in the ready queue.
    assert not bench.sent(), "nothing goes out before its start is durable"
    assert _started(bench.commit()) == [(f"r{n}", 0) for n in range(4)]
    assert bench.sent() == ["r0.t0", "r1.t0"]
    handle = bench.pool.workers[0]
    assert list(handle.on_deck) == [("r2", 1, 0, 1), ("r3", 1, 0, 1)]

    bench.outcome("r0.t0")
    # The next on deck is sent in the same turn, before any commit; the
    # outcome is recorded, and a start fills the freed place on deck.
    assert bench.sent() == ["r0.t0", "r1.t0", "r2.t0"]
    assert [type(e).__name__ for e in bench.recorded] == ["TaskCompleted"]
    assert _started(bench.commit()) == [("r4", 0)]
    assert list(handle.on_deck) == [("r3", 1, 0, 1), ("r4", 1, 0, 1)]
    assert bench.sent() == ["r0.t0", "r1.t0", "r2.t0"], "no slot freed since"


@on_loop
async def test_a_tries_timeout_counts_from_its_sending_not_its_start() -> None:
    bench = Bench(limit=1)
    first, second = bench.run("a", 1.0), bench.run("b", 2.0)
    bench.start(first, second)
    bench.now += 20.0
    bench.outcome("a.t0")
    handle = bench.pool.workers[0]
    assert handle.tries == {("b", 1, 0, 1): bench.now + 30.0}


@on_loop
async def test_a_try_whose_start_is_not_durable_holds_back_those_after_it() -> None:
    bench = Bench(limit=1)
    runs = [bench.run(f"r{n}", float(n)) for n in range(3)]
    for live in runs[:2]:
        bench.queue(live, 0)
    bench.dispatcher.pump()  # r0 and r1: one append
    bench.commit()
    bench.queue(runs[2], 0)
    bench.outcome("r0.t0")  # sends r1 from deck, starts r2 (not durable)
    assert bench.sent() == ["r0.t0", "r1.t0"]
    bench.outcome("r1.t0")
    assert bench.sent() == ["r0.t0", "r1.t0"], "r2's start is not durable yet"
    bench.commit()
    assert bench.sent() == ["r0.t0", "r1.t0", "r2.t0"]


@on_loop
async def test_a_lost_worker_charges_the_tries_it_ran_and_not_those_on_deck() -> None:
    bench = Bench(limit=1)
    ran, waited = bench.run("ran", 1.0), bench.run("waited", 2.0)
    bench.start(ran, waited)
    handle = bench.pool.workers[0]
    handle.alive, handle.lost_reason = False, "killed by SIGKILL"
    bench.dispatcher.reschedule_lost(handle)
    failed = {e.run_id: e for e in bench.commit() if isinstance(e, TaskFailed)}
    assert failed["ran"].error.type.endswith("WorkerLost")
    assert failed["waited"].error.type.endswith("Interrupted")
    assert "before the try was sent" in failed["waited"].error.message
    assert ran.state.steps[(1, 0)].lost_workers == 1
    assert waited.state.steps[(1, 0)].lost_workers == 0
    assert waited.state.steps[(1, 0)].failures == 0
    assert not handle.on_deck and not handle.tries


@on_loop
async def test_a_cancelled_runs_tries_on_deck_are_never_sent() -> None:
    bench = Bench(limit=1)
    first, cancelled = bench.run("first", 1.0), bench.run("cancelled", 2.0)
    bench.start(first, cancelled)
    bench.dispatcher.cancel_tries("cancelled")
    bench.outcome("first.t0")
    bench.commit()
    assert bench.sent() == ["first.t0"]
    assert not bench.pool.workers[0].on_deck


@on_loop
async def test_a_try_on_deck_too_long_is_interrupted_to_start_again_elsewhere() -> None:
    bench = Bench(workers=("busy", "free"), limit=1)
    long_run, waiting = bench.run("long", 1.0), bench.run("waiting", 2.0)
    bench.queue(long_run, 0)
    bench.dispatcher.pump()  # long goes to "busy"...
    # ...and "waiting" to its deck, as if "free" had been full at the time.
    free = bench.pool.workers[1]
    free.alive = False
    bench.queue(waiting, 0)
    bench.dispatcher.pump()
    free.alive = True
    bench.commit()
    busy = bench.pool.workers[0]
    assert list(busy.on_deck) == [("waiting", 1, 0, 1)]

    bench.now += dispatch.ON_DECK_WAIT_S / 2
    bench.dispatcher._move_waiting(busy, bench.now)
    assert not bench.recorded, "it has not waited long enough yet"
    bench.now += dispatch.ON_DECK_WAIT_S
    bench.dispatcher._move_waiting(busy, bench.now)
    (failed,) = bench.recorded
    assert isinstance(failed, TaskFailed) and failed.retry_at == bench.now
    assert failed.error.type.endswith("Interrupted")
    step = waiting.state.steps[(1, 0)]
    assert step.status is StepStatus.BACKOFF and step.failures == 0
    assert not busy.on_deck
    # Due again at once, it starts on the worker with room.
    bench.queue(waiting, 0)
    bench.dispatcher.pump()
    bench.commit()
    assert bench.sent(1) == ["waiting.t0"]


@pytest.mark.parametrize("limit", [1, 3])
def test_a_worker_never_holds_more_tries_than_its_limit(limit: int) -> None:
    async def main() -> None:
        bench = Bench(limit=limit)
        runs = [bench.run(f"r{n}", float(n)) for n in range(4 * limit)]
        for live in runs:
            bench.queue(live, 0)
        bench.dispatcher.pump()
        handle = bench.pool.workers[0]
        done = 0
        while done < len(runs):
            bench.commit()
            assert len(handle.tries) <= limit
            assert len(handle.tries) + len(handle.on_deck) <= 2 * limit
            for key in list(handle.tries):
                bench.outcome(bench._task(key))
                done += 1
                assert len(handle.tries) <= limit
        assert bench.sent() == [f"r{n}.t0" for n in range(4 * limit)]

    asyncio.run(main())


@on_loop
async def test_a_try_on_deck_keeps_its_place_when_no_other_worker_has_room() -> None:
    bench = Bench(workers=("only",), limit=1)
    running, waiting, younger = (bench.run(r, n) for n, r in enumerate("rwy"))
    bench.start(running, waiting)
    only = bench.pool.workers[0]
    bench.now += 10 * dispatch.ON_DECK_WAIT_S
    bench.dispatcher._move_waiting(only, bench.now)
    assert not bench.recorded, "moving it would only put it behind younger runs"
    assert list(only.on_deck) == [("w", 1, 0, 1)]
    bench.queue(younger, 0)
    bench.outcome("r.t0")
    assert bench.sent() == ["r.t0", "w.t0"]


@on_loop
async def test_a_suspect_gets_a_worker_of_its_own_even_under_load() -> None:
    bench = Bench(workers=("a", "b"), limit=1)
    runs = [bench.run(f"r{n}", float(n)) for n in range(8)]
    bench.start(*runs[:4])  # each worker runs one and has one on deck
    suspect = bench.run("s", 0.5)  # older than all of them
    bench.dispatcher._suspects.add(("s", 1, 0))
    for live in [suspect, *runs[4:]]:
        bench.queue(live, 0)
    a, b = bench.pool.workers
    bench.outcome("r0.t0", worker=0)  # a sends r2 from its deck...
    assert bench.dispatcher._draining is a, "...and runs dry for the suspect"
    assert not bench.commit(), "nothing new started on a worker"
    bench.outcome("r1.t0", worker=1)  # b takes the others meanwhile
    bench.commit()
    assert bench.sent(1) == ["r1.t0", "r3.t0"]
    assert list(b.on_deck) == [("r4", 1, 0, 1)]
    bench.outcome("r2.t0", worker=0)  # a is idle: the suspect runs there, alone
    assert a.exclusive and bench.dispatcher._draining is None
    bench.commit()
    assert bench.sent(0) == ["r0.t0", "r2.t0", "s.t0"]
    assert list(a.tries) == [("s", 1, 0, 1)] and not a.on_deck
    bench.outcome("s.t0", worker=0)
    assert not a.exclusive and ("s", 1, 0) not in bench.dispatcher._suspects
    bench.commit()
    assert bench.sent(0)[-1] == "r5.t0", "a takes others again"


@on_loop
async def test_a_suspects_worker_takes_others_again_if_its_try_is_cancelled() -> None:
    bench = Bench(workers=("a",), limit=1)
    suspect, other = bench.run("s", 1.0), bench.run("o", 2.0)
    bench.dispatcher._suspects.add(("s", 1, 0))
    bench.queue(suspect, 0)
    bench.dispatcher.pump()  # on deck, its start not durable yet
    (a,) = bench.pool.workers
    assert a.exclusive
    bench.dispatcher.cancel_tries("s")
    assert not a.exclusive
    bench.start(other)
    assert bench.sent() == ["o.t0"]


@on_loop
async def test_tries_whose_starts_failed_to_be_written_hold_back_no_others() -> None:
    bench = Bench(limit=1)
    runs = [bench.run(f"r{n}", float(n)) for n in range(4)]
    bench.start(runs[0])
    bench.queue(runs[1], 0)
    bench.queue(runs[2], 0)
    bench.outcome("r0.t0")  # r1 and r2 on deck, their starts being written
    (handle,) = bench.pool.workers
    assert list(handle.on_deck) == [("r1", 1, 0, 1), ("r2", 1, 0, 1)]
    await bench.fail()
    assert not handle.on_deck, "their runs are reread; nothing is sent of them"
    bench.start(runs[3])
    assert bench.sent() == ["r0.t0", "r3.t0"]


@on_loop
async def test_a_worker_that_ran_a_suspect_takes_the_next_suspect_first() -> None:
    bench = Bench(workers=("a", "b"), limit=1)
    first, second = bench.run("s1", 1.0), bench.run("s2", 20.0)
    younger = [bench.run(f"r{n}", 10.0 + n) for n in range(4)]
    bench.dispatcher._suspects |= {("s1", 1, 0), ("s2", 1, 0)}
    bench.start(first)  # alone on a
    bench.start(*younger[:2])  # b runs one and has one on deck
    a, b = bench.pool.workers
    assert a.exclusive and bench.sent(1) == ["r0.t0"]
    for live in [second, *younger[2:]]:
        bench.queue(live, 0)
    bench.dispatcher.pump()  # no worker with room: all wait
    bench.outcome("s1.t0", worker=0)
    # a is idle: the next suspect goes there, before the older runs waiting.
    bench.commit()
    assert bench.sent(0) == ["s1.t0", "s2.t0"] and a.exclusive
    assert list(b.on_deck) == [("r1", 1, 0, 1)]


@on_loop
async def test_a_suspect_whose_run_ended_is_forgotten() -> None:
    bench = Bench(limit=1)
    gone, other = bench.run("gone", 1.0), bench.run("other", 2.0)
    bench.dispatcher._suspects.add(("gone", 1, 0))
    bench.queue(gone, 0)
    del bench.runs["gone"]  # finished or cancelled while queued
    bench.start(other)
    assert not bench.dispatcher._suspects
    assert bench.sent() == ["other.t0"]
