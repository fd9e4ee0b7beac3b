"""A plain-def try whose run ended keeps its thread; later tries do not wait.

With real processes: `coda run` with one worker and two slots, whose threads
are kept busy by tries the supervisor no longer counts (their runs were
cancelled, or returned without awaiting them). A try sent next must run at
once: the supervisor's clock for its timeout is already running.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coda.journal.events import TaskCompleted, TaskFailed

from .support import CodaProcess, running_supervisor, wait_for


@pytest.fixture
def one_worker(workdir: Path) -> Iterator[CodaProcess]:
    """`coda run e2e_app` with one worker that holds two tries at a time."""
    with running_supervisor(workdir, ("-c", "2"), workers=1) as supervisor:
        yield supervisor


def test_a_try_after_cancelled_runs_runs_within_its_timeout(
    one_worker: CodaProcess,
) -> None:
    (worker,) = one_worker.worker_pids()
    with one_worker.client() as client:
        # Both slots' threads sleep 15 s in tries of runs that are cancelled.
        for name in ("first", "second"):
            marker = one_worker.workdir / name
            args = {"marker": str(marker), "seconds": 15.0, "sync": True}
            client.submit("interruptible", args, run_id=name)
            wait_for(marker.exists, 10, f"the try of run {name} to start")
            assert client.cancel(name)
            assert client.wait(name)["status"] == "cancelled"

        # A 0.05 s task with a timeout of 1 s: it runs now, not in 15 s.
        started = time.monotonic()
        assert client.run("punctual", {"seconds": 0.05}, timeout=10) == "slept"
        assert time.monotonic() - started < 1.0

    tries = [
        e
        for e in one_worker.history(_only_run(one_worker, "punctual"))
        if isinstance(e, (TaskCompleted, TaskFailed))
    ]
    assert [type(e) for e in tries] == [TaskCompleted]
    # Nobody was blamed: the worker is the one that ran the abandoned tries.
    assert one_worker.worker_pids() == [worker]


def test_a_run_that_returned_early_holds_up_no_later_try(
    one_worker: CodaProcess,
) -> None:
    with one_worker.client() as client:
        for _ in range(2):
            started = time.monotonic()
            assert client.run("race", {"seconds": 15.0}, timeout=20) == "fast won"
            assert time.monotonic() - started < 3.0


def _only_run(coda: CodaProcess, workflow: str) -> str:
    (run,) = [r for r in coda.runs() if r.workflow == workflow]
    return str(run.run_id)
