"""How a worker runs tries: plain-def ones on its own threads, outcomes sent back.

These drive `Worker` in-process with a connection that records what is sent,
so that they can look at threads and at what a cancelled try does.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import coda
from coda import decide
from coda.definitions import Registry
from coda.journal import codec
from coda.journal.events import RetryPolicy
from coda.protocol import Connection, FrameDecoder, encode_frame
from coda.runtime.worker import Worker
from coda.state import fold

from .support import decoded


class RecordingConnection:
    """Records what a worker sends, as the supervisor reads it, with the raw
    values (a task's result) decoded in their places."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed = False

    def send(self, msg: dict[str, Any]) -> None:
        (received,) = FrameDecoder(raw=True).feed(encode_frame(msg))
        self.sent.append(decoded(received))

    def flush(self) -> None:
        pass  # sent at once already


registry = Registry()
seen_threads: list[str] = []
gate = threading.Event()


@coda.task(registry=registry)
def where() -> str:
    seen_threads.append(threading.current_thread().name)
    return threading.current_thread().name


@coda.task(registry=registry)
def wait_for_gate(mark: str) -> str:
    seen_threads.append(mark)
    gate.wait(10)
    return mark


@coda.task(registry=registry)
async def wait_async(mark: str) -> str:
    seen_threads.append(mark)
    await asyncio.sleep(10)
    return mark


FATAL = {
    "exit": SystemExit(3),
    "interrupt": KeyboardInterrupt(),
    "cancelled": asyncio.CancelledError(),
}


@coda.task(registry=registry)
def raises(kind: str) -> None:
    raise FATAL[kind]


@coda.task(registry=registry)
async def async_raises(kind: str) -> None:
    raise FATAL[kind]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words for it")


@coda.task(registry=registry)
def raises_unprintable() -> None:
    raise Unprintable()


@coda.task(registry=registry)
def returns(value: Any) -> Any:
    if value == "set":
        return {1, 2}
    return value


@coda.task(registry=registry)
async def async_double(n: int) -> int:
    await asyncio.sleep(0)
    return n * 2


def on_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def _try(task: str, run: str = "r", step: int = 0, **args: Any) -> dict[str, Any]:
    return {
        "op": "task",
        "run": run,
        "attempt": 1,
        "step": step,
        "try": 1,
        "task": task,
        "args": args,
    }


async def _outcomes(conn: RecordingConnection, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while len(conn.sent) < count:
        assert time.monotonic() < deadline, f"only {conn.sent} sent"
        await asyncio.sleep(0.005)
    return conn.sent


def _worker(threads: int = 4, name: str = "t") -> tuple[Worker, RecordingConnection]:
    conn = RecordingConnection()
    worker = Worker(conn, registry, name, threads)  # type: ignore[arg-type]
    worker.threads.loop = asyncio.get_running_loop()
    return worker, conn


@pytest.fixture(autouse=True)
def _reset() -> Any:
    seen_threads.clear()
    gate.clear()
    yield
    gate.set()


@on_loop
async def test_plain_def_tries_run_on_long_lived_threads() -> None:
    worker, conn = _worker()
    for step in range(3):
        worker._start_try(_try("where", step=step))
        await _outcomes(conn, step + 1)
    # One after the other, they find the same thread waiting: none is started
    # per try, and none of them ran on the loop's thread.
    assert len(set(seen_threads)) == 1
    assert seen_threads[0] != threading.current_thread().name
    assert [m["result"] for m in conn.sent] == seen_threads
    assert [(m["op"], m["ok"], m["step"]) for m in conn.sent] == [
        ("outcome", True, 0),
        ("outcome", True, 1),
        ("outcome", True, 2),
    ]
    assert not worker.by_run
    worker.threads.shutdown()


@on_loop
async def test_a_thread_for_each_concurrent_try_up_to_the_limit() -> None:
    worker, conn = _worker(threads=2)
    for step in range(3):
        worker._start_try(_try("wait_for_gate", step=step, mark=f"m{step}"))
    time.sleep(0.2)
    # Two threads, each busy: the third try waits for one of them.
    assert sorted(seen_threads) == ["m0", "m1"]
    gate.set()
    sent = await _outcomes(conn, 3)
    assert sorted(m["result"] for m in sent) == ["m0", "m1", "m2"]
    worker.threads.shutdown()


@on_loop
async def test_a_try_queued_while_a_thread_runs_is_taken_by_that_thread() -> None:
    """A thread finishing a try takes the next one queued: no other thread is
    woken (nor, here, started) for a try that a running one is about to take."""
    worker, conn = _worker(threads=4)
    worker._start_try(_try("where", step=0))
    worker._start_try(_try("where", step=1))
    # The loop is held, as it is while it reads a burst of messages: only the
    # thread running the first try can take the second.
    time.sleep(0.2)
    sent = await _outcomes(conn, 2)
    assert [m["step"] for m in sent] == [0, 1]
    assert len(set(seen_threads)) == 1, seen_threads
    worker.threads.shutdown()


@on_loop
async def test_a_try_queued_behind_a_long_one_soon_gets_a_thread() -> None:
    """...but a try never waits for a slow one to end: after DEFER_S, a
    sleeping thread is woken for it."""
    worker, conn = _worker(threads=4)
    worker.threads.start_all()
    worker._start_try(_try("wait_for_gate", step=0, mark="slow"))
    worker._start_try(_try("where", step=1))
    await _outcomes(conn, 1)  # while the first still waits for the gate
    assert [(m["step"], m["ok"]) for m in conn.sent] == [(1, True)]
    assert seen_threads[0] == "slow"
    gate.set()
    await _outcomes(conn, 2)
    worker.threads.shutdown()


@on_loop
async def test_a_try_queued_behind_a_long_one_starts_while_the_loop_is_held() -> None:
    """The loop may be held (an `async def` task that blocks, long workflow
    code) while the supervisor's clock for a queued try runs: a thread of
    the worker's own then starts it."""
    worker, conn = _worker(threads=4)
    worker.threads.start_all()
    worker._start_try(_try("wait_for_gate", step=0, mark="slow"))
    worker._start_try(_try("where", step=1))
    time.sleep(0.3)  # the loop held: no timer of its own can fire
    assert len(seen_threads) == 2, seen_threads
    gate.set()
    await _outcomes(conn, 2)
    worker.threads.shutdown()


@on_loop
async def test_cancel_fails_the_tries_and_drops_what_they_return() -> None:
    worker, conn = _worker(threads=1)
    worker._start_try(_try("wait_for_gate", step=0, mark="running"))
    worker._start_try(_try("wait_for_gate", step=1, mark="queued"))
    worker._start_try(_try("where", run="other", step=0))
    time.sleep(0.1)
    assert seen_threads == ["running"]

    _cancel(worker, "r")
    errors = [(m["step"], m["ok"], m["error"]["type"]) for m in conn.sent]
    cancelled = "asyncio.exceptions.CancelledError"
    assert sorted(errors) == [(0, False, cancelled), (1, False, cancelled)]

    gate.set()
    sent = await _outcomes(conn, 3)
    await asyncio.sleep(0.1)
    # The running try finished, unheard; the queued one never started; the
    # other run's try ran as usual.
    assert seen_threads[0] == "running" and "queued" not in seen_threads
    assert len(sent) == 3 and sent[2]["run"] == "other" and sent[2]["ok"]
    assert not worker.by_run
    worker.threads.shutdown()


def _cancel(worker: Worker, run: str, only: list[int] | None = None) -> None:
    message: dict[str, Any] = {"op": "cancel", "run": run}
    if only is not None:
        message["try"] = only
    worker.on_message(message)


@pytest.mark.parametrize("task", ["raises", "async_raises"])
@pytest.mark.parametrize("kind", sorted(FATAL))
@on_loop
async def test_exit_interrupt_and_cancelled_are_the_tries_failure(
    kind: str, task: str
) -> None:
    worker, conn = _worker()
    worker._start_try(_try(task, kind=kind))
    worker._start_try(_try("where", step=1))
    sent = await _outcomes(conn, 2)
    by_step = {m["step"]: m for m in sent}
    expected = type(FATAL[kind]).__qualname__
    assert not by_step[0]["ok"] and by_step[0]["error"]["type"].endswith(expected)
    assert f"{task}\n" in by_step[0]["error"]["traceback"]
    assert by_step[1]["ok"]
    worker.threads.shutdown()


@on_loop
async def test_an_outcome_that_cannot_be_described_is_a_failure_too() -> None:
    worker, conn = _worker(threads=1)
    worker._start_try(_try("raises_unprintable"))
    worker._start_try(_try("where", step=1))
    first, second = await _outcomes(conn, 2)
    assert not first["ok"] and first["error"]["message"] == "no words for it"
    assert second["ok"]  # on the same, only, thread
    worker.threads.shutdown()


@pytest.mark.parametrize(
    ("value", "ok"),
    [(None, True), (True, True), (False, True), ([1, "a"], True), ("set", False)],
)
@on_loop
async def test_results_are_checked_as_json(value: Any, ok: bool) -> None:
    worker, conn = _worker()
    worker._start_try(_try("returns", value=value))
    (sent,) = await _outcomes(conn, 1)
    assert sent["ok"] is ok
    if ok:
        assert sent["result"] == value
    else:
        assert sent["error"]["type"] == "coda.errors.ValueNotJSON"
        assert "result of task returns" in sent["error"]["message"]
    worker.threads.shutdown()


@on_loop
async def test_async_and_unknown_tasks_still_run_on_the_loop() -> None:
    worker, conn = _worker()
    worker._start_try(_try("async_double", n=21))
    worker._start_try(_try("missing", step=1))
    sent = await _outcomes(conn, 2)
    by_step = {m["step"]: m for m in sent}
    assert by_step[0]["ok"] and by_step[0]["result"] == 42
    assert by_step[1]["error"]["type"] == "coda.errors.UnknownNameError"
    worker.threads.shutdown()


def _try_threads(worker: Worker) -> list[threading.Thread]:
    # Each test that counts threads names its worker apart from the others.
    prefix = f"{worker.threads.prefix}_"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


@on_loop
async def test_a_try_never_waits_for_a_thread_kept_busy_by_a_cancelled_one() -> None:
    worker, conn = _worker(threads=1, name="replaced")
    worker._start_try(_try("wait_for_gate", run="ended", mark="abandoned"))
    await asyncio.sleep(0.1)
    assert seen_threads == ["abandoned"]
    _cancel(worker, "ended")
    assert [(m["run"], m["ok"]) for m in conn.sent] == [("ended", False)]

    # The only slot is free again, though the function still runs in its
    # thread: the next try gets a thread of its own at once, and keeps it.
    started = time.monotonic()
    for step in range(3):
        worker._start_try(_try("where", run="next", step=step))
        await _outcomes(conn, 2 + step)
    assert time.monotonic() - started < 2.0
    assert not gate.is_set()
    assert [(m["run"], m["ok"]) for m in conn.sent[1:]] == [("next", True)] * 3
    assert len(set(seen_threads[1:])) == 1
    assert len(_try_threads(worker)) == 2

    # The abandoned function returns: its outcome is dropped, and its thread
    # ends, the one slot being held by the other.
    gate.set()
    deadline = time.monotonic() + 5
    while len(_try_threads(worker)) > 1:
        assert time.monotonic() < deadline, _try_threads(worker)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert len(conn.sent) == 4
    worker._start_try(_try("where", run="last"))
    await _outcomes(conn, 5)
    assert conn.sent[4]["result"] == seen_threads[1]
    assert not worker.by_run
    worker.threads.shutdown()


@on_loop
async def test_an_abandoned_thread_takes_a_slot_again_when_one_is_free() -> None:
    worker, conn = _worker(threads=2, name="rejoined")
    worker._start_try(_try("wait_for_gate", run="ended", mark="abandoned"))
    await asyncio.sleep(0.1)
    _cancel(worker, "ended")
    gate.set()
    await asyncio.sleep(0.1)
    # Nothing took its slot meanwhile: the thread lives on and runs the next.
    (thread,) = _try_threads(worker)
    worker._start_try(_try("where", run="next"))
    await _outcomes(conn, 2)
    assert conn.sent[1]["result"] == thread.name
    worker.threads.shutdown()


@on_loop
async def test_started_threads_wait_for_tries_and_no_more_are_made() -> None:
    worker, conn = _worker(threads=3, name="prestarted")
    worker.threads.start_all()
    started = _try_threads(worker)
    assert len(started) == 3
    for index in range(6):
        worker._start_try(_try("where", run=f"r{index}"))
    await _outcomes(conn, 6)
    assert {m["result"] for m in conn.sent} <= {t.name for t in started}
    assert len(_try_threads(worker)) == 3
    worker.threads.start_all()  # every slot has its thread already
    assert len(_try_threads(worker)) == 3
    worker.threads.shutdown()


@on_loop
async def test_one_try_of_a_run_is_cancelled_and_its_others_go_on() -> None:
    worker, conn = _worker(threads=2, name="one-of-many")
    worker._start_try(_try("wait_for_gate", run="r", step=0, mark="kept"))
    worker._start_try(_try("wait_for_gate", run="r", step=1, mark="dropped"))
    worker._start_try(_try("wait_async", run="r", step=2, mark="async"))
    await asyncio.sleep(0.1)
    _cancel(worker, "r", only=[1, 1, 1])
    _cancel(worker, "r", only=[1, 2, 1])
    _cancel(worker, "r", only=[1, 7, 1])  # not here: nothing happens
    outcomes = await _outcomes(conn, 2)
    assert sorted((m["step"], m["ok"]) for m in outcomes) == [(1, False), (2, False)]
    assert all("CancelledError" in m["error"]["type"] for m in outcomes)
    gate.set()
    outcomes = await _outcomes(conn, 3)
    assert (outcomes[2]["step"], outcomes[2]["result"]) == (0, "kept")
    await asyncio.sleep(0.05)
    assert len(conn.sent) == 3  # the cancelled thread's return is dropped
    assert not worker.by_run
    worker.threads.shutdown()


@on_loop
async def test_serve_handles_messages_as_they_arrive_until_stop() -> None:
    ours, theirs = socket.socketpair()
    supervisor = await Connection.from_socket(ours, name="worker", raw=True)
    conn = await Connection.from_socket(theirs, name="supervisor")
    worker = Worker(conn, registry, "served", 1)
    serving = asyncio.create_task(worker.serve())
    await asyncio.sleep(0.01)
    # A try, then stop in the same write: the try's outcome still goes out,
    # and nothing after the stop is handled.
    supervisor.send_many([_try("where"), {"op": "stop"}, {"op": "ping"}])
    async with asyncio.timeout(5):
        await serving
        outcome = await supervisor.recv()
    assert outcome is not None and outcome["ok"] and outcome["op"] == "outcome"
    await conn.close()
    assert await supervisor.recv() is None  # no pong
    await supervisor.close()
    worker.threads.shutdown()


@coda.workflow(registry=registry)
async def doubled(n: int) -> int:
    return await coda.context.spawn_task(async_double, args={"n": n}) + 0


@coda.workflow(registry=registry)
async def at_once(n: int) -> int:
    return n


def _activation(workflow: str, run: str) -> dict[str, Any]:
    state, events = decide.new_run(run, workflow, {"n": 3}, RetryPolicy(), 100.0)
    events += decide.start_attempt(fold(events) or state, 100.0)
    return {
        "op": "activate",
        "run": run,
        "n": 1,
        "workflow": workflow,
        "args": {"n": 3},
        "full": True,
        "events": [codec.encode_dict(e) for e in events],
    }


@on_loop
async def test_an_instance_whose_code_ended_is_let_go_and_the_answer_says_so() -> None:
    worker, conn = _worker()
    worker.on_message(_activation("doubled", "waits"))
    worker.on_message(_activation("at_once", "ends"))
    waits, ends = conn.sent
    assert (waits["run"], ends["run"]) == ("waits", "ends")
    assert "finished" not in waits
    assert ends["finished"] is True
    assert [c["type"] for c in ends["commands"]] == ["CompleteRun"]
    assert list(worker.instances) == ["waits"]
