"""Stopping `coda run` with SIGTERM while tasks run, and starting it again."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from coda.errors import CodaError
from coda.journal.events import TaskCompleted, TaskFailed, TaskStarted
from coda.runtime.client import Client

from .support import CodaProcess, wait_for


def test_sigterm_interrupts_running_tries_and_restart_finishes(
    coda: CodaProcess,
) -> None:
    markers = {f"stop-{n}": coda.workdir / f"marker-{n}" for n in range(4)}
    with coda.client() as client:
        for n, (run_id, marker) in enumerate(markers.items()):
            # Both kinds of task: on the worker's loop and in its threads.
            args = {"marker": str(marker), "seconds": 30, "sync": n % 2 == 1}
            client.submit("interruptible", args, run_id=run_id)
    wait_for(lambda: all(m.exists() for m in markers.values()), 10, "4 tries running")
    workers = coda.worker_pids()

    started = time.monotonic()
    code = coda.stop(signal.SIGTERM, timeout=15)
    took = time.monotonic() - started

    assert code == 0, coda.log_text()
    assert took < 5, f"the supervisor took {took:.1f}s to stop"
    assert len(workers) == 2
    coda.workers_gone(timeout=2)
    assert not coda.socket.exists()
    for run_id in markers:
        history = coda.history(run_id)
        failed = [e for e in history if isinstance(e, TaskFailed)]
        assert len(failed) == 1, history
        assert failed[0].try_number == 1
        assert failed[0].error.type == "coda.errors.Interrupted"
        assert failed[0].retry_at is not None
        assert not any(isinstance(e, TaskCompleted) for e in history)
    assert {r.run_id: r.status for r in coda.runs()} == dict.fromkeys(
        markers, "running"
    )

    coda.start()
    with coda.client() as client:
        results = {r: client.result(r, timeout=15) for r in markers}

    for run_id, marker in markers.items():
        first_pid = int(marker.read_text())
        assert results[run_id]["first_pid"] == first_pid
        assert results[run_id]["pid"] != first_pid
        history = coda.history(run_id)
        tries = [e.try_number for e in history if isinstance(e, TaskStarted)]
        # The interrupted try ran again for free: the task has max_retries=0.
        assert tries == [1, 2]
        assert [e.try_number for e in history if isinstance(e, TaskCompleted)] == [2]
    assert "Traceback" not in coda.log_text()


def test_sigterm_when_idle_exits_0_and_leaves_nothing(coda: CodaProcess) -> None:
    with coda.client() as client:
        assert client.result(client.submit("quick", {"x": 1}), timeout=10) == 3
    coda.worker_pids()

    code = coda.stop(signal.SIGTERM, timeout=10)

    assert code == 0
    coda.workers_gone(timeout=2)
    assert not coda.socket.exists()
    assert "Traceback" not in coda.log_text()


def test_sigterm_while_clients_come_and_go(coda: CodaProcess) -> None:
    """Connections ending as the supervisor stops end quietly too."""

    async def churn() -> int:
        async def one_client() -> None:
            client = await Client.connect(coda.socket, timeout=2)
            await client.stats()
            await client.close()

        served = 0
        signal_at = time.monotonic() + 0.3
        while True:
            if signal_at and time.monotonic() > signal_at:
                coda.signal(signal.SIGTERM)  # once: then wait for it to stop
                signal_at = 0.0
            try:
                await asyncio.gather(*(one_client() for _ in range(8)))
            except (CodaError, OSError):
                return served  # the supervisor has gone
            served += 8

    served = asyncio.run(churn())

    assert served > 0
    assert coda.wait_exit(timeout=10) == 0
    assert "Traceback" not in coda.log_text()
    assert " ERROR " not in coda.log_text()


def test_sigterm_while_a_worker_is_being_replaced(coda: CodaProcess) -> None:
    """A worker still starting when the supervisor stops is stopped with the
    others: the supervisor leaves no process of its own behind."""
    before = coda.worker_pids()
    os.kill(before[0][0], signal.SIGKILL)
    # The replacement has started and not yet said hello (a Python process
    # importing the app takes a good fraction of a second).
    wait_for(
        lambda: set(coda.worker_pids()) - set(before),
        5,
        "the replacement worker process",
    )
    coda.signal(signal.SIGTERM)

    assert coda.wait_exit(timeout=10) == 0
    assert coda.leftovers() == []
    assert "Traceback" not in coda.log_text()


def test_a_run_waiting_to_retry_at_a_stop_retries_after_the_restart(
    coda: CodaProcess,
) -> None:
    """A run between two attempts when the supervisor stops has nothing to
    dispatch after the restart: its next attempt must start all the same."""
    side, flag = coda.workdir / "side.txt", coda.workdir / "flag"
    args = {"side_file": str(side), "tag": "t", "flag": str(flag)}
    with coda.client() as client:
        client.submit("flaky_retrying", args, run_id="retry-across")
    wait_for(
        lambda: (
            {r.run_id: r.status for r in coda.runs()}.get("retry-across") == "retrying"
        ),
        10,
        "the first attempt to fail",
    )
    assert coda.stop(signal.SIGTERM, timeout=10) == 0
    flag.touch()
    time.sleep(2.0)  # past the retry's time: due at once after the restart

    coda.start()
    with coda.client() as client:
        result = client.result("retry-across", timeout=15)

    assert result == {"prepare": "prepared t", "check": "flag set"}
    assert [r.status for r in coda.runs() if r.run_id == "retry-across"] == [
        "completed"
    ]
