"""A run that completes with a task its code spawned and never awaited says so."""

from __future__ import annotations

from coda.journal.events import TaskCompleted, TaskScheduled

from .support import CodaProcess, wait_for


def test_a_task_spawned_and_not_awaited_is_named_when_the_run_completes(
    coda: CodaProcess,
) -> None:
    with coda.client() as client:
        run_id = client.submit("forgets_a_task", {}, run_id="forgetful")
        assert client.result(run_id, timeout=20) == "done"
    line = wait_for(
        lambda: next(
            (x for x in coda.log_text().splitlines() if "did not await" in x), None
        ),
        10,
        "the warning",
    )
    assert "run forgetful completed with 1 task(s)" in line
    assert "step 0 (double)" in line
    history = coda.history("forgetful")
    assert [e.task for e in history if isinstance(e, TaskScheduled)] == ["double"]
    assert not [e for e in history if isinstance(e, TaskCompleted)]
