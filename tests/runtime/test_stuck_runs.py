"""A run whose workflow code waits on something that is not a task is parked,
named as stuck, instead of showing "running" for ever without a word."""

from __future__ import annotations

import pytest

from coda.errors import RunParkedError
from coda.journal.events import RunParked, TaskCompleted

from .support import CodaProcess


@pytest.mark.parametrize("after_a_task", [False, True], ids=["at-once", "after-a-task"])
def test_a_run_waiting_on_nothing_that_can_come_is_parked_as_stuck(
    coda: CodaProcess, after_a_task: bool
) -> None:
    with coda.client() as client:
        run_id = client.submit(
            "waits_for_nothing", {"after_a_task": after_a_task}, run_id="stuck"
        )
        with pytest.raises(RunParkedError) as parked:
            client.result(run_id, timeout=20)
        # Other runs go on.
        assert client.result(client.submit("quick", {"x": 2}), timeout=20) == 5
    message = str(parked.value)
    assert "run stuck is stuck: its workflow code waits" in message
    assert "coda resume stuck" in message
    history = coda.history("stuck")
    assert isinstance(history[-1], RunParked)
    completed = [e for e in history if isinstance(e, TaskCompleted)]
    assert len(completed) == (1 if after_a_task else 0)
