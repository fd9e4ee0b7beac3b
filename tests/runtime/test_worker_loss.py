"""A worker process killed with SIGKILL in the middle of a task."""

from __future__ import annotations

import os
import signal

import pytest

from coda.journal.events import TaskCompleted, TaskFailed, TaskStarted

from .support import CodaProcess, is_running, process_id, wait_for


@pytest.mark.parametrize("sync", [False, True], ids=["async-task", "thread-task"])
def test_task_of_a_killed_worker_runs_again_elsewhere(
    coda: CodaProcess, sync: bool
) -> None:
    marker = coda.workdir / "marker"
    workers_before = set(coda.worker_pids())
    with coda.client() as client:
        run_id = client.submit(
            "interruptible",
            {"marker": str(marker), "seconds": 30, "sync": sync},
            run_id="lose-a-worker",
        )
        pid = int(wait_for(lambda: marker.exists() and marker.read_text(), 10))
        victim = process_id(pid)
        assert victim in workers_before, "the try should run in a worker process"

        os.kill(pid, signal.SIGKILL)
        result = client.result(run_id, timeout=15)

        # A replacement worker took the dead one's place, and said hello.
        stats = wait_for(
            lambda: (s := client.stats())["workers"] == 2 and s, 10, "2 workers"
        )
        workers_after = set(coda.worker_pids())

    assert result == {"marker": str(marker), "first_pid": pid, "pid": result["pid"]}
    assert result["pid"] != pid
    assert not is_running(victim)
    assert victim not in workers_after
    assert len(workers_after - workers_before) == 1
    assert stats["workers_lost"] == 1
    assert stats["workers"] == 2

    history = coda.history(run_id)
    task_events = [
        e for e in history if isinstance(e, (TaskStarted, TaskFailed, TaskCompleted))
    ]
    assert [(type(e).__name__, e.try_number) for e in task_events] == [
        ("TaskStarted", 1),
        ("TaskFailed", 1),
        ("TaskStarted", 2),
        ("TaskCompleted", 2),
    ]
    failed = task_events[1]
    assert isinstance(failed, TaskFailed)
    assert failed.error.type == "coda.errors.WorkerLost"
    assert "SIGKILL" in failed.error.message
    assert failed.retry_at is not None
    # The lost try does not count against the task's max_retries=0.
    assert task_events[3].result == {"first_pid": pid, "pid": result["pid"]}
    assert task_events[0].worker != task_events[2].worker


def test_killed_worker_is_replaced_while_idle(coda: CodaProcess) -> None:
    victim, survivor = coda.worker_pids()
    os.kill(victim[0], signal.SIGKILL)

    with coda.client() as client:
        wait_for(
            lambda: (s := client.stats())["workers_lost"] == 1 and s["workers"] == 2,
            10,
            "a replacement worker",
        )
        results = [client.result(client.submit("quick", {"x": x})) for x in range(6)]

    workers = coda.worker_pids()
    assert victim not in workers
    assert survivor in workers
    assert len(workers) == 2
    assert results == [2 * x + 1 for x in range(6)]
