"""A host's answer to an earlier activation of a run is stale, and dropped.

After an append fails, the supervisor rereads the run's history and may host
it again on the same worker; an answer the worker sent to the activation
before that (made by code that saw a history the journal did not keep) must
not be decided on. The supervisor runs in this process with one stand-in
worker whose messages the test writes by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from coda.definitions import load_app
from coda.journal.events import RetryPolicy, RunSubmitted, TaskScheduled
from coda.journal.sqlite import SQLiteJournal
from coda.replay.engine import CompleteRun, ScheduleTask
from coda.runtime.pool import WorkerHandle
from coda.runtime.supervisor import Supervisor
from coda.runtime.wire import encode_command

from .support import APP, APPS


class Outbox:
    """The stand-in worker's connection: what the supervisor sends it."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)


@contextlib.asynccontextmanager
async def _stand_in(
    tmp_path: Path, linger: float = 0.0
) -> AsyncIterator[tuple[Supervisor, WorkerHandle, Outbox, SQLiteJournal]]:
    """A supervisor in this process whose one worker is `Outbox`."""
    journal = await SQLiteJournal.open(tmp_path / "coda.db")
    supervisor = Supervisor(journal, APP, load_app(APP), workers=0)
    supervisor.LINGER = linger
    outbox = Outbox()
    worker = WorkerHandle("w1", None, outbox, 0.0)  # type: ignore[arg-type]
    supervisor.pool.workers.append(worker)
    await supervisor.start()
    try:
        yield supervisor, worker, outbox, journal
    finally:
        supervisor.pool.workers.clear()
        await supervisor.stop()
        await journal.close()


@pytest.fixture(autouse=True)
def _app_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))


def test_an_answer_to_an_earlier_activation_is_dropped(tmp_path: Path) -> None:
    asyncio.run(_stale(tmp_path))


def _schedule(run_id: str, n: int | None, x: int) -> dict[str, Any]:
    command = ScheduleTask(
        attempt=1,
        step=0,
        task="double",
        args={"x": x},
        cache_key=None,
        policy=RetryPolicy(),
        timeout=None,
    )
    msg = {"op": "commands", "run": run_id, "commands": [encode_command(command)]}
    if n is not None:
        msg["n"] = n
    return msg


async def _stale(tmp_path: Path) -> None:
    async with _stand_in(tmp_path) as (supervisor, worker, outbox, journal):
        assert await supervisor.submit("quick", {"x": 4}, "r1") == ("r1", True)
        first = [m for m in outbox.sent if m["op"] == "activate"]
        assert [m["n"] for m in first] == [1]
        run = supervisor.runs["r1"]

        # The run is taken from its host and hosted there again (as after a
        # reread): activation 2 is in flight, and activation 1's answer
        # arrives only now.
        supervisor.activations.unhost(worker, "r1")
        supervisor.activations.activate(run)
        assert [m["n"] for m in outbox.sent if m["op"] == "activate"] == [1, 2]
        supervisor._on_worker_message(worker, _schedule("r1", 1, x=99))
        await asyncio.sleep(0.05)
        assert run.activating, "a stale answer ended the activation in flight"
        assert not [e for e in run.history if isinstance(e, TaskScheduled)]

        # The answer to activation 2 is the one decided on.
        supervisor._on_worker_message(worker, _schedule("r1", 2, x=4))
        await asyncio.sleep(0.05)
        scheduled = [e for e in run.history if isinstance(e, TaskScheduled)]
        assert [e.args for e in scheduled] == [{"x": 4}]
        history = await journal.history("r1")
        assert isinstance(history[0], RunSubmitted)
        assert [e.args for e in history if isinstance(e, TaskScheduled)] == [{"x": 4}]


def test_a_try_the_supervisor_stops_counting_is_cancelled_on_its_worker(
    tmp_path: Path,
) -> None:
    asyncio.run(_forgotten_try(tmp_path))


async def _forgotten_try(tmp_path: Path) -> None:
    linger = Supervisor.LINGER
    async with _stand_in(tmp_path, linger) as (supervisor, worker, outbox, _):
        assert await supervisor.submit("quick", {"x": 4}, "r1") == ("r1", True)
        state = supervisor.runs["r1"].state
        # A try the worker holds whose start the journal does not have (its
        # append failed): once the state is reread, the try is not counted.
        worker.tries[("r1", 1, 5, 1)] = None
        supervisor.dispatcher.reconcile_tries("r1", state)
        assert ("r1", 1, 5, 1) not in worker.tries
        cancels = [m for m in outbox.sent if m["op"] == "cancel"]
        assert cancels == [{"op": "cancel", "run": "r1", "try": [1, 5, 1]}]


def test_a_worker_running_a_suspect_alone_is_free_once_that_run_ends(
    tmp_path: Path,
) -> None:
    asyncio.run(_suspect_of_a_cancelled_run(tmp_path))


async def _task_sent(outbox: Outbox, run_id: str) -> bool:
    for _ in range(100):
        if any(m["op"] == "task" and m["run"] == run_id for m in outbox.sent):
            return True
        await asyncio.sleep(0.01)
    return False


async def _suspect_of_a_cancelled_run(tmp_path: Path) -> None:
    async with _stand_in(tmp_path) as (supervisor, worker, outbox, _):
        # r1's step ran on a worker that died with others: it runs alone.
        supervisor.dispatcher._suspects.add(("r1", 1, 0))
        assert await supervisor.submit("quick", {"x": 4}, "r1") == ("r1", True)
        supervisor._on_worker_message(worker, _schedule("r1", 1, x=4))
        assert await _task_sent(outbox, "r1")
        assert worker.exclusive

        # The run is cancelled while its try runs: the worker takes others.
        assert await supervisor.cancel("r1", "enough")
        assert not worker.exclusive
        assert not supervisor.dispatcher._suspects
        assert await supervisor.submit("quick", {"x": 5}, "r2") == ("r2", True)
        # Activation numbers are the supervisor's: r2's first is not 1.
        *_, n = [m["n"] for m in outbox.sent if m["op"] == "activate"]  # r2's
        supervisor._on_worker_message(worker, _schedule("r2", n, x=5))
        assert await _task_sent(outbox, "r2"), "the worker stayed reserved for r1's try"
        # r1's outcome, should it still come, is dropped.
        supervisor._on_worker_message(
            worker,
            {"op": "outcome", "run": "r1", "attempt": 1, "step": 0, "try": 1,
             "ok": True, "result": 8},
        )  # fmt: skip
        assert list(worker.tries) == [("r2", 1, 0, 1)]


@pytest.mark.parametrize("let_go", [True, False])
def test_a_host_that_let_the_instance_go_is_not_told_to_drop_it(
    tmp_path: Path, let_go: bool
) -> None:
    asyncio.run(_ended_instance(tmp_path, let_go))


async def _ended_instance(tmp_path: Path, let_go: bool) -> None:
    async with _stand_in(tmp_path) as (supervisor, worker, outbox, _):
        assert await supervisor.submit("echo", {"value": 7}, "r1") == ("r1", True)
        waiter = supervisor.waiter("r1")
        assert waiter is not None
        answer = {
            "op": "commands",
            "run": "r1",
            "n": 1,
            "commands": [encode_command(CompleteRun(attempt=1, result=7))],
        }
        if let_go:
            answer["finished"] = True
        supervisor._on_worker_message(worker, answer)
        summary = await asyncio.wait_for(waiter, 5)
        assert (summary.status, summary.result) == ("completed", 7)
        drops = [m for m in outbox.sent if m["op"] == "drop"]
        assert drops == ([] if let_go else [{"op": "drop", "run": "r1"}])
        assert "r1" not in worker.hosted


def test_an_answer_to_a_run_before_it_was_retried_is_dropped(tmp_path: Path) -> None:
    asyncio.run(_answer_from_before_a_retry(tmp_path))


async def _answer_from_before_a_retry(tmp_path: Path) -> None:
    async with _stand_in(tmp_path) as (supervisor, worker, outbox, _):
        assert await supervisor.submit("echo", {"value": 7}, "r1") == ("r1", True)
        # Cancelled and retried while the host still runs the first
        # activation's code: the retried run is hosted on the same worker.
        assert await supervisor.cancel("r1", "enough")
        assert await supervisor.reopen("r1", "again")
        activations = [m for m in outbox.sent if m["op"] == "activate"]
        assert len(activations) == 2
        before, after = (m["n"] for m in activations)

        # The answer to the activation before the cancel arrives now: its
        # code returned, and the host let that instance go.
        def answer(n: int, attempt: int) -> dict[str, Any]:
            complete = CompleteRun(attempt=attempt, result=7)
            return {
                "op": "commands",
                "run": "r1",
                "n": n,
                "commands": [encode_command(complete)],
                "finished": True,
            }

        supervisor._on_worker_message(worker, answer(before, 1))
        run = supervisor.runs["r1"]
        assert run.activating, "an answer from before the retry was taken"
        assert run.host is worker

        # The answer to the retried run's activation completes it.
        waiter = supervisor.waiter("r1")
        assert waiter is not None
        supervisor._on_worker_message(worker, answer(after, 2))
        summary = await asyncio.wait_for(waiter, 5)
        assert (summary.status, summary.result) == ("completed", 7)
