"""A supervisor that was itself stopped does not blame its workers for it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coda.journal.events import TaskCompleted, TaskFailed

from .support import CodaProcess, fresh_directory, running_supervisor, wait_for

HEARTBEAT = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", "1.5")


@pytest.fixture
def coda() -> Iterator[CodaProcess]:
    with fresh_directory() as path, running_supervisor(path, HEARTBEAT) as sup:
        yield sup


def test_a_stopped_supervisor_keeps_its_workers(coda: CodaProcess) -> None:
    marker = Path(coda.workdir / "marker")
    workers_before = set(coda.worker_pids())
    with coda.client() as client:
        run_id = client.submit(
            "interruptible", {"marker": str(marker), "seconds": 1.0}, run_id="stall"
        )
        wait_for(marker.exists, 10, "the task to start")

        # Stopped for longer than the heartbeat timeout, while the task runs
        # and its result waits, unread, in the socket.
        coda.signal(signal.SIGSTOP)
        time.sleep(3.0)
        coda.signal(signal.SIGCONT)

        result = client.result(run_id, timeout=20)
    assert result["first_pid"] == result["pid"]
    history = coda.history("stall")
    assert not any(isinstance(e, TaskFailed) for e in history), history
    assert sum(isinstance(e, TaskCompleted) for e in history) == 1
    assert set(coda.worker_pids()) == workers_before
    assert "supervisor stalled" in coda.log_text()
