"""`coda.Client` and `coda.SyncClient` against a real supervisor."""

from __future__ import annotations

import pytest

from coda.errors import RunFailedError, RunNotFound

from .support import CodaProcess


def test_run_submits_and_waits_in_one_call(coda: CodaProcess) -> None:
    with coda.client() as client:
        assert client.run("quick", {"x": 20}, run_id="client-run-1") == 41
        # The same id again is the same run: its result, without a second run.
        assert client.run("quick", {"x": 999}, run_id="client-run-1") == 41
        status = client.status("client-run-1")
    assert status["status"] == "completed"
    assert status["result"] == 41
    history = coda.history("client-run-1")
    assert sum(type(e).__name__ == "RunSubmitted" for e in history) == 1


def test_result_raises_what_the_run_ended_with(coda: CodaProcess) -> None:
    with coda.client() as client:
        run_id = client.submit("doomed", {"message": "no luck"})
        with pytest.raises(RunFailedError, match="no luck"):
            client.result(run_id)
        with pytest.raises(RunNotFound):
            client.status("no-such-run-anywhere")
