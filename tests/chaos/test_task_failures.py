"""Tasks that kill, hang or abuse their worker, through a real `coda run`.

One worker, so that "the same worker answered the next task" is a question of
pids. Small heartbeat settings for the hung worker, so that it is found in two
seconds rather than ten.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from coda.journal.events import TaskCompleted, TaskFailed, TaskScheduled
from tests.chaos.procs import Coda, short_workdir, wait_finished

APP = "tests.chaos.failures_app"
HEARTBEAT = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", "2")


@pytest.fixture
def coda() -> Iterator[Coda]:
    with short_workdir() as workdir, Coda(workdir, APP) as supervisor:
        yield supervisor
        print(supervisor.log_text())  # shown for a failing test only


@pytest.fixture
def coda_quick_heartbeat() -> Iterator[Coda]:
    with short_workdir() as workdir, Coda(workdir, APP, *HEARTBEAT) as supervisor:
        yield supervisor
        print(supervisor.log_text())


def _run(coda: Coda, workflow: str, args: dict[str, Any], timeout: float) -> Any:
    with coda.client() as client:
        run_id = client.submit(workflow, args)
        return run_id, wait_finished(client, run_id, timeout)


def _tries(coda: Coda, run_id: str, task: str) -> list[TaskFailed | TaskCompleted]:
    """The outcomes of every try of `task`'s steps in the run, in order."""
    history = coda.history(run_id)
    steps = {
        (e.attempt, e.step)
        for e in history
        if isinstance(e, TaskScheduled) and e.task == task
    }
    return [
        e
        for e in history
        if isinstance(e, (TaskFailed, TaskCompleted)) and (e.attempt, e.step) in steps
    ]


@pytest.mark.parametrize(
    ("task", "how"),
    [("exits_its_worker", "exited with code 3"), ("segfaults", "SIGSEGV")],
)
def test_a_task_that_kills_its_worker_fails_after_its_budget(
    coda: Coda, task: str, how: str
) -> None:
    run_id, summary = _run(coda, "call", {"names": [task]}, timeout=60)

    # The run goes on: the workflow sees a TaskError (WorkerLost) and carries on.
    assert summary["status"] == "completed", summary
    [outcome] = summary["result"]
    assert outcome["error"] == "coda.errors.WorkerLost"
    # max_lost_workers=2: the first try and two more, then it fails for good.
    tries = _tries(coda, run_id, task)
    assert len(tries) == 3, tries
    for failure in tries:
        assert isinstance(failure, TaskFailed)
        assert failure.error.type == "coda.errors.WorkerLost"
        assert how in failure.error.message, failure.error.message
    assert [isinstance(f, TaskFailed) and f.retry_at is None for f in tries] == [
        False,
        False,
        True,
    ]
    # ... and a replacement worker answers the next task.
    assert outcome["pid_after"] in coda.worker_pids()
    # Workers killed by a task they ran are not taken for an app that cannot
    # start: no growing wait before the next, no advice about imports.
    assert "keep dying" not in coda.log_text()


RAISERS = [
    ("raises_system_exit", "SystemExit"),
    ("raises_system_exit_async", "SystemExit"),
    ("raises_keyboard_interrupt", "KeyboardInterrupt"),
    ("raises_keyboard_interrupt_async", "KeyboardInterrupt"),
    ("raises_cancelled", "asyncio.exceptions.CancelledError"),
    ("raises_cancelled_async", "asyncio.exceptions.CancelledError"),
]


def test_base_exceptions_are_failures_of_their_task_and_the_worker_survives(
    coda: Coda,
) -> None:
    [worker] = coda.worker_pids()
    names = [name for name, _ in RAISERS]
    run_id, summary = _run(coda, "call", {"names": names}, timeout=60)

    assert summary["status"] == "completed", summary
    for (name, error), outcome in zip(RAISERS, summary["result"], strict=True):
        assert outcome == {"task": name, "error": error, "pid_after": worker}
        [failure] = _tries(coda, run_id, name)
        assert isinstance(failure, TaskFailed)
        assert failure.error.type == error
    assert coda.worker_pids() == [worker]


def test_an_async_task_blocking_the_loop_is_found_by_the_heartbeat(
    coda_quick_heartbeat: Coda,
) -> None:
    coda = coda_quick_heartbeat
    [worker] = coda.worker_pids()
    run_id, summary = _run(coda, "call", {"names": ["blocks_the_loop"]}, timeout=60)

    assert summary["status"] == "completed", summary
    [outcome] = summary["result"]
    assert outcome["error"] == "coda.errors.WorkerLost"
    tries = _tries(coda, run_id, "blocks_the_loop")
    assert len(tries) == 2, tries  # max_lost_workers=1
    for failure in tries:
        assert isinstance(failure, TaskFailed)
        assert "no heartbeat" in failure.error.message, failure.error.message
    # Killed and replaced: another process answered the next task.
    assert outcome["pid_after"] != worker
    assert outcome["pid_after"] in coda.worker_pids()


def test_a_plain_task_spinning_past_its_timeout_fails_with_task_timeout(
    coda: Coda,
) -> None:
    [worker] = coda.worker_pids()
    run_id, summary = _run(coda, "call", {"names": ["spins"]}, timeout=60)

    assert summary["status"] == "completed", summary
    [outcome] = summary["result"]
    assert outcome["error"] == "coda.errors.TaskTimeout"
    [failure] = _tries(coda, run_id, "spins")
    assert isinstance(failure, TaskFailed)
    assert failure.retry_at is None  # a timeout is the task's own failure
    assert outcome["pid_after"] != worker


def test_tasks_that_shared_a_worker_with_a_crashing_task_still_complete(
    coda: Coda,
) -> None:
    run_id, summary = _run(coda, "crowd", {"innocents": 3}, timeout=90)

    assert summary["status"] == "completed", summary
    assert summary["result"] == {
        "innocents": [0, 10, 20],
        "crasher": "coda.errors.WorkerLost",
    }
    # The first crash is charged to every try on the worker; from then on each
    # runs alone, so each innocent task completes on its next try, and the
    # crasher alone uses up its budget.
    history = coda.history(run_id)
    innocents = {
        e.step for e in history if isinstance(e, TaskScheduled) and e.task == "innocent"
    }
    for step in innocents:
        outcomes = [
            e
            for e in history
            if isinstance(e, (TaskFailed, TaskCompleted)) and e.step == step
        ]
        assert isinstance(outcomes[-1], TaskCompleted), outcomes
        assert len(outcomes) <= 2, outcomes  # lost at most once, with the crasher
    crasher = _tries(coda, run_id, "crashes_after")
    assert len(crasher) == 3, crasher
    assert all(isinstance(e, TaskFailed) for e in crasher)
