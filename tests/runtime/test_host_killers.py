"""A run whose workflow code takes its worker down is parked, not re-hosted
for ever at the cost of every other run's tries."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from coda.errors import RunParkedError
from coda.journal.events import RunParked, TaskFailed

from .support import CodaProcess, fresh_directory, running_supervisor, wait_for

HEARTBEAT = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", "1.5")


@pytest.fixture
def coda() -> Iterator[CodaProcess]:
    with fresh_directory() as path, running_supervisor(path, HEARTBEAT) as sup:
        yield sup


@pytest.mark.parametrize("how", ["exit", "block"])
def test_a_run_whose_code_takes_its_hosts_down_is_parked(
    coda: CodaProcess, how: str
) -> None:
    with coda.client() as client:
        # Other runs' tries on the same workers (a plain-def task each).
        others = [client.submit("bystander", {"seconds": 1.0}) for _ in range(6)]
        culprit = client.submit("takes_host_down", {"how": how}, run_id="culprit")
        with pytest.raises(RunParkedError) as parked:
            client.result(culprit, timeout=30)
        results = [client.result(run_id, timeout=30) for run_id in others]
        stats = client.stats()
        wait_for(lambda: client.stats()["workers"] == 2, 10, "two workers again")

    message = str(parked.value)
    assert "workflow code of run culprit" in message
    assert "coda resume culprit" in message
    # Two hosts lost to it, then no more.
    assert stats["workers_lost"] == 2
    assert results == ["slept"] * 6
    history = coda.history("culprit")
    assert [type(e).__name__ for e in history][-1] == RunParked.__name__
    # The others' tries lost with those hosts ran again, within their budget.
    for run_id in others:
        lost = [e for e in coda.history(run_id) if isinstance(e, TaskFailed)]
        assert len(lost) <= 2
    blamed = [
        line.rsplit(" ", 1)[-1]
        for line in coda.log_text().splitlines()
        if "while running the workflow code of run " in line
    ]
    # The other runs' activations that waited behind it are not blamed.
    assert blamed == ["culprit", "culprit"]
