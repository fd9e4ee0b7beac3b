"""`coda.Client` and `coda.SyncClient` against a real supervisor."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from coda.errors import (
    RunFailedError,
    RunIdConflict,
    RunNotFound,
    ValueNotJSON,
    ValueTooLarge,
)
from coda.runtime.client import Client, RequestError
from coda.values import DEFAULT_MAX_VALUE_BYTES

from .support import CodaProcess, base_env


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


def test_values_that_are_not_json_are_refused_before_sending(
    coda: CodaProcess,
) -> None:
    with coda.client() as client:
        with pytest.raises(ValueNotJSON, match=r'args of workflow quick\["x"\]'):
            client.submit("quick", {"x": float("nan")}, run_id="nan-run")
        with pytest.raises(ValueNotJSON, match="tuple"):
            client.submit("quick", {"x": (1, 2)}, run_id="tuple-run")
        with pytest.raises(RunNotFound):
            client.status("nan-run")


def test_args_over_the_value_limit_are_refused_with_the_limit_named(
    coda: CodaProcess,
) -> None:
    big = {"value": "x" * (DEFAULT_MAX_VALUE_BYTES + 1)}
    with coda.client() as client:
        # Through the client's own check...
        with pytest.raises(ValueTooLarge, match=str(DEFAULT_MAX_VALUE_BYTES)):
            client.submit("echo", big, run_id="too-big")
        # ...and through the supervisor's, for a client that skips it.
        with pytest.raises(RequestError, match=str(DEFAULT_MAX_VALUE_BYTES)):
            client.request("submit", workflow="echo", args=big, run_id="too-big")
        with pytest.raises(RunNotFound):
            client.status("too-big")
        # The supervisor goes on serving.
        assert client.run("quick", {"x": 1}) == 3


def test_a_run_id_names_one_run_of_one_workflow(coda: CodaProcess) -> None:
    with coda.client() as client:
        assert client.run("quick", {"x": 2}, run_id="owned-id") == 5
        with pytest.raises(RunIdConflict, match="'quick'"):
            client.submit("echo", {"value": 1}, run_id="owned-id")
        with pytest.raises(RequestError, match="empty run id"):
            client.request("submit", workflow="quick", args={"x": 1}, run_id="")


def test_concurrent_retries_of_a_failed_run_reopen_it_once(
    coda: CodaProcess,
) -> None:
    with coda.client() as client:
        run_id = client.submit("doomed", {"message": "fails"}, run_id="retry-twice")
        with pytest.raises(RunFailedError):
            client.result(run_id)

    async def both() -> list[bool]:
        first = await Client.connect(coda.socket)
        second = await Client.connect(coda.socket)
        try:
            return list(await asyncio.gather(first.retry(run_id), second.retry(run_id)))
        finally:
            await first.close()
            await second.close()

    assert sorted(asyncio.run(both())) == [False, True]
    with coda.client() as client, pytest.raises(RunFailedError):
        client.result(run_id)
    history = coda.history(run_id)
    assert sum(type(e).__name__ == "RunRetried" for e in history) == 1
    assert [e.attempt for e in history if type(e).__name__ == "AttemptStarted"] == [
        1,
        2,
    ]


def test_a_sync_client_never_closed_leaves_no_warning_at_exit(
    coda: CodaProcess,
) -> None:
    script = (
        "import coda, sys\n"
        "client = coda.SyncClient(sys.argv[1])\n"
        "print(client.run('quick', {'x': 1}))\n"
    )
    done = _script(coda, script)
    assert done.stdout.strip() == "3"


def test_a_sync_client_collected_under_a_running_loop_closes_quietly(
    coda: CodaProcess,
) -> None:
    # The garbage collector runs wherever it is triggered: here a SyncClient
    # in a reference cycle is collected while another event loop runs.
    script = (
        "import asyncio, gc, coda, sys\n"
        "class Holder: pass\n"
        "holder = Holder()\n"
        "holder.cycle = holder\n"
        "holder.client = coda.SyncClient(sys.argv[1])\n"
        "print(holder.client.run('quick', {'x': 1}))\n"
        "del holder\n"
        "async def collect():\n"
        "    gc.collect()\n"
        "asyncio.run(collect())\n"
        "print('collected')\n"
    )
    done = _script(coda, script)
    assert done.stdout.split() == ["3", "collected"]


def _script(coda: CodaProcess, script: str) -> subprocess.CompletedProcess[str]:
    """Run `script` with the supervisor's socket as its argument; it must end
    well and print nothing on stderr."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(coda.socket)],
        capture_output=True,
        text=True,
        timeout=60,
        env=base_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done


@pytest.mark.parametrize("in_workflow", [False, True], ids=["task", "workflow"])
def test_an_error_naming_a_file_that_is_not_utf8_fails_the_run_clearly(
    coda: CodaProcess, in_workflow: bool
) -> None:
    # b"caf\xe9.txt" (Latin-1) as os.listdir gives it: "caf\udce9.txt". No
    # JSON encoder writes a lone surrogate; the message must still arrive,
    # at once, with the byte escaped, and no worker may die of it.
    name = "636166e92e747874"
    with coda.client() as client:
        run_id = client.submit(
            "missing_input", {"hex_bytes": name, "in_workflow": in_workflow}
        )
        started = time.monotonic()
        with pytest.raises(RunFailedError) as info:
            client.result(run_id, timeout=20)
        assert time.monotonic() - started < 10, "failed by a timeout, not the error"
        # quick(x) is double(x) + 1: the workers still run other runs.
        assert client.result(client.submit("quick", {"x": 2}), timeout=20) == 5
        stats = client.stats()
    assert "caf\\udce9.txt" in str(info.value)
    assert stats["workers_lost"] == 0
