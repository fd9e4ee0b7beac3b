"""The requests the server answers by callbacks, in every outcome.

Submitting with no run id and waiting for a live run are answered without a
task per request (`ClientServer._answer_now`). Here a real client talks to a
supervisor in this process, with real workers, on a journal that can be made
to refuse appends (a full disk), and every way those requests can end is
driven: a durable submission, a refused one, an unknown workflow, a run that
finished before its waiter asked, and `run` (submit and wait in one request).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import coda.runtime.server as server_module
from coda.definitions import load_app
from coda.errors import ProtocolError, RunFailedError, RunNotFound, UnknownNameError
from coda.runtime.client import Client, RequestError
from coda.runtime.server import ClientServer
from coda.runtime.supervisor import Supervisor

from .support import APP, APPS, FillingJournal, base_env
from .test_client_socket import HELLO, message


@pytest.fixture(autouse=True)
def _app_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))


@contextlib.asynccontextmanager
async def _serving(
    tmp_path: Path, max_frame_bytes: int = 64 * 1024 * 1024
) -> AsyncIterator[tuple[FillingJournal, Supervisor, Client]]:
    """A supervisor with one worker, its client server, and a client of it."""
    journal = await FillingJournal.open(tmp_path / "coda.db")
    supervisor = Supervisor(
        journal, APP, load_app(APP), workers=1, worker_env=base_env()
    )
    server = ClientServer(
        supervisor, socket_path=tmp_path / "s.sock", max_frame_bytes=max_frame_bytes
    )
    await supervisor.start()
    await server.start()
    client = await Client.connect(tmp_path / "s.sock")
    try:
        yield journal, supervisor, client
    finally:
        await client.close()
        await server.close()
        await supervisor.stop()
        await journal.close()


async def _welcomed(
    socket: Path,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection past its hello, for requests written by hand."""
    reader, writer = await asyncio.open_unix_connection(socket)
    writer.write(message(HELLO))
    assert (await _read_message(reader))["op"] == "welcome"
    return reader, writer


def test_submit_and_wait_answered_by_callbacks(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))


async def _scenario(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (journal, supervisor, client):
        async with asyncio.timeout(30):
            # Durable submissions, answered once written; their waits too.
            ids = await asyncio.gather(
                *(client.submit("quick", {"x": i}) for i in range(20))
            )
            assert len(set(ids)) == 20
            summaries = await asyncio.gather(*(client.wait(r) for r in ids))
            assert [s["result"] for s in summaries] == [2 * i + 1 for i in range(20)]
            assert all(s["status"] == "completed" for s in summaries)

            # A wait for a run that has left memory is answered from the journal.
            assert (await client.wait(ids[0]))["result"] == 1

            # Submit and wait in one request.
            assert await client.run("quick", {"x": 5}) == 11

            # An unknown workflow: an error reply, the connection stays open.
            with pytest.raises(UnknownNameError, match="nope"):
                await client.submit("nope", {})

            # A submission the journal refuses is not acknowledged, and the
            # run is not left behind in the supervisor.
            live = len(supervisor.runs)
            journal.full = True
            with pytest.raises(RequestError, match="could not be recorded") as info:
                await client.submit("quick", {"x": 1})
            assert info.value.code == "failed"
            with pytest.raises(RequestError, match="could not be recorded"):
                await client.run("quick", {"x": 2})
            assert len(supervisor.runs) == live
            journal.full = False

            # And everything works again afterwards, on the same connection.
            assert await client.run("quick", {"x": 7}) == 15
            assert supervisor.stats.submitted == 22


def test_requests_the_supervisor_must_refuse_or_cannot_answer(tmp_path: Path) -> None:
    asyncio.run(_refusals(tmp_path))


async def _refusals(tmp_path: Path) -> None:
    # A small frame limit, so that a reply can be too large for it.
    async with (
        _serving(tmp_path, max_frame_bytes=64 * 1024) as (
            journal,
            supervisor,
            client,
        ),
        asyncio.timeout(30),
    ):
        # Arguments that are not an object, and ids that are not strings,
        # are refused: never read as "no arguments" or "make up an id".
        for args in ([], 0, "", False):
            with pytest.raises(RequestError, match="must be a JSON object"):
                await client.request("submit", workflow="quick", args=args)
        for run_id in (0, False):
            with pytest.raises(RequestError, match="is not valid"):
                await client.request(
                    "submit", workflow="quick", args={"x": 1}, run_id=run_id
                )
        # Too deep for the journal: refused before anything is written.
        deep: object = 1
        for _ in range(150):
            deep = [deep]
        with pytest.raises(RequestError, match="levels deep"):
            await client.request(
                "submit", workflow="echo", args={"value": deep}, run_id="deep"
            )
        assert await journal.run("deep") is None

        # A reply over the client's frame limit becomes an error reply,
        # and the connection goes on. (The history holds the value twice:
        # in the submission and in the result.)
        big = "x" * 40_000
        assert await client.run("echo", {"value": big}, run_id="big") == big
        with pytest.raises(RequestError, match="over the frame limit"):
            await client.request("history", run_id="big")
        assert await client.run("quick", {"x": 1}) == 3

        # A wait for a run whose submission the journal then refuses is
        # answered (the run does not exist), not left waiting for ever.
        journal.full = True
        submit = asyncio.ensure_future(
            client.request("submit", workflow="quick", args={"x": 1}, run_id="x1")
        )
        while "x1" not in supervisor.runs:
            await asyncio.sleep(0)
        with pytest.raises(RunNotFound, match="could not be recorded"):
            await client.wait("x1")
        with pytest.raises(RequestError, match="could not be recorded"):
            await submit
        journal.full = False

        # A request the supervisor does not know closes the connection: the
        # refusal answers no request id, and the requests waiting fail with it.
        with pytest.raises(RequestError, match="unknown request 'launch'"):
            await client.request("launch")
        with pytest.raises(ProtocolError, match="closed"):
            await client.request("stats")


def test_a_client_that_does_not_read_its_replies_is_not_read_either(
    tmp_path: Path,
) -> None:
    asyncio.run(_unread_replies(tmp_path))


async def _read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    msg: dict[str, Any] = orjson.loads(await reader.readexactly(length))
    return msg


async def _unread_replies(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (_, _, client), asyncio.timeout(60):
        # A run whose history is about 6 MB: three of its replies pass the
        # supervisor's 16 MiB limit of replies waiting for one client.
        big = "x" * 3_000_000
        assert len(await client.run("echo", {"value": big}, run_id="big")) == len(big)
        reader, writer = await _welcomed(tmp_path / "s.sock")
        # Requests of 500 KB each, no reply read: once past the limit the
        # supervisor stops reading, the kernel's buffers (a few hundred KB)
        # fill, and sending stalls long before all 20 are out.
        pad = "p" * 500_000
        requests = [
            message({"op": "history", "id": n, "run_id": "big", "pad": pad})
            for n in range(20)
        ]
        sent = 0
        for request in requests:
            writer.write(request)
            try:
                await asyncio.wait_for(writer.drain(), 2.0)
            except TimeoutError:
                break
            sent += 1
        assert sent < 10, f"all {sent} requests were read without their replies"
        # Reading the replies lets the rest through, and every one is answered.
        writer.write(b"".join(requests[sent + 1 :]))
        answered = {(await _read_message(reader))["id"] for _ in requests}
        assert answered == set(range(len(requests)))
        writer.close()


def test_a_wait_that_times_out_says_for_what(tmp_path: Path) -> None:
    asyncio.run(_timeouts(tmp_path))


async def _timeouts(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (_, _, client), asyncio.timeout(30):
        run_id = await client.submit("punctual", {"seconds": 5})
        with pytest.raises(TimeoutError, match=f"run {run_id} did not finish within"):
            await client.result(run_id, timeout=0.2)
        with pytest.raises(TimeoutError, match="the run of punctual did not finish"):
            await client.run("punctual", {"seconds": 5}, timeout=0.2)
        # Both runs go on; the connection too.
        assert (await client.status(run_id))["status"] == "running"


def test_large_results_are_read_for_waits_only_as_the_client_takes_them(
    tmp_path: Path,
) -> None:
    # Waits have 256 places (a client may wait for thousands of finished
    # runs); a summary read for one leaves out a large result, which is read
    # only once the client has room for it.
    asyncio.run(_unread_waits(tmp_path))


async def _unread_waits(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (journal, _, client), asyncio.timeout(60):
        big = "x" * 3_000_000
        assert len(await client.run("echo", {"value": big}, run_id="big")) == len(big)
        reads = whole = 0
        read_run = journal.run

        async def counted(run_id: str, **options: Any) -> Any:
            nonlocal reads, whole
            reads += 1
            whole += options.get("result_limit") is None
            return await read_run(run_id, **options)

        journal.run = counted  # type: ignore[method-assign]
        reader, writer = await _welcomed(tmp_path / "s.sock")
        # Small waits for a run that has left memory, all in one write and
        # none of their replies read: each reply (3 MB) is read from the
        # journal, and only as many as fit the client's backlog (16 MiB).
        writer.write(
            b"".join(
                message({"op": "wait", "id": n, "run_id": "big"}) for n in range(40)
            )
        )
        while reads < 40:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        assert whole <= 10, f"{whole} results of 3 MB read for a client not reading"
        answered = {(await _read_message(reader))["id"] for _ in range(40)}
        assert answered == set(range(40))
        assert whole == 40
        writer.close()


def test_replies_to_many_waits_for_one_run_wait_for_the_client_to_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replied: list[str] = []
    reply = server_module._reply

    def counted(conn: Any, msg: dict[str, Any], answer: dict[str, Any]) -> None:
        replied.append(msg["op"])
        reply(conn, msg, answer)

    monkeypatch.setattr(server_module, "_reply", counted)
    asyncio.run(_waits_on_a_live_run(tmp_path, replied))


async def _waits_on_a_live_run(tmp_path: Path, replied: list[str]) -> None:
    # Many waits for one live run with a large result, sent and not read:
    # answered when the run ends, but each reply (a copy of the result once
    # encoded) made only as the client reads.
    async with _serving(tmp_path) as (_, _, client), asyncio.timeout(60):
        gate = tmp_path / "gate"
        run_id = await client.submit(
            "gated_echo", {"value": "y" * 1_000_000, "gate": str(gate)}
        )
        reader, writer = await _welcomed(tmp_path / "s.sock")
        writer.write(
            b"".join(
                message({"op": "wait", "id": n, "run_id": run_id}) for n in range(200)
            )
        )
        await asyncio.sleep(0.3)
        gate.write_text("go")
        assert (await client.wait(run_id))["status"] == "completed"
        await asyncio.sleep(0.5)
        # 200 replies of 1 MB: about the backlog's worth (16 MiB) made.
        made = replied.count("wait")
        assert made <= 24, f"{made} replies of 1 MB made for a client not reading"
        answered = {(await _read_message(reader))["id"] for _ in range(200)}
        assert answered == set(range(200))
        writer.close()


def test_a_listing_leaves_large_results_out(tmp_path: Path) -> None:
    asyncio.run(_listing(tmp_path))


async def _listing(tmp_path: Path) -> None:
    # Twenty runs of 4 MB: 80 MB in one reply, over the client's frame limit
    # (here 64 MiB), and as much in the supervisor's memory for one request.
    async with _serving(tmp_path) as (_, _, client), asyncio.timeout(120):
        big = "z" * 4_000_000
        for n in range(20):
            await client.run("echo", {"value": big}, run_id=f"big-{n}")
        await client.run("echo", {"value": "small"}, run_id="small")
        listed = {run["run_id"]: run for run in await client.runs(limit=30)}
        assert len(listed) == 21
        assert listed["small"]["result"] == "small"
        assert "result_left_out" not in listed["small"]
        assert listed["big-3"]["result"] is None
        assert listed["big-3"]["result_left_out"] is True
        assert listed["big-3"]["status"] == "completed"
        # The run itself still has it.
        assert (await client.status("big-3"))["result"] == big


def test_a_late_error_for_an_abandoned_request_is_not_a_refusal(
    tmp_path: Path,
) -> None:
    asyncio.run(_abandoned_request(tmp_path))


async def _abandoned_request(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (_, _, client), asyncio.timeout(30):
        # A request whose caller gave up (cancelled, timed out) before its
        # error reply came: the reply answers that request, and the client
        # goes on.
        status = asyncio.ensure_future(client.status("nope"))
        await asyncio.sleep(0)
        status.cancel()
        assert (await client.stats())["op"] == "stats"
        assert await client.run("quick", {"x": 1}) == 3


def test_closing_a_client_fails_the_requests_waiting_on_it(tmp_path: Path) -> None:
    asyncio.run(_closed_under_waiters(tmp_path))


async def _closed_under_waiters(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (_, _, client), asyncio.timeout(30):
        run_id = await client.submit("punctual", {"seconds": 5})
        waiting = asyncio.ensure_future(client.result(run_id))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(ProtocolError, match="closed"):
            await asyncio.wait_for(waiting, 5)


def test_a_wait_for_a_run_finished_lately_reads_nothing(tmp_path: Path) -> None:
    asyncio.run(_finished_lately(tmp_path))


async def _finished_lately(tmp_path: Path) -> None:
    # A client that submits a burst and then waits for each run asks for many
    # after they finished: their summaries come from memory, not the journal.
    async with (
        _serving(tmp_path) as (journal, supervisor, client),
        asyncio.timeout(60),
    ):
        run_ids = [await client.submit("quick", {"x": n}) for n in range(20)]
        first = await client.result(run_ids[-1])
        reads = 0
        read_run = journal.run

        async def counted(run_id: str, **options: Any) -> Any:
            nonlocal reads
            reads += 1
            return await read_run(run_id, **options)

        journal.run = counted  # type: ignore[method-assign]
        results = [await client.result(run_id) for run_id in run_ids]
        assert results == [await client.result(r) for r in run_ids]
        assert first == results[-1] and len(set(results)) == 20
        assert reads == 0
        # A run finished long ago (no longer kept): the journal is asked.
        supervisor.finished.drop(run_ids[0])
        assert await client.result(run_ids[0]) == results[0]
        assert reads == 1


def test_finished_runs_are_kept_within_their_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from coda.journal.base import RunSummary
    from coda.runtime.runs import FinishedRuns

    def summary(run_id: str, result: Any) -> RunSummary:
        return RunSummary(
            run_id=run_id, workflow="w", status="completed", attempt=1,
            submitted_at=1.0, updated_at=2.0, events=3, result=result, error=None,
        )  # fmt: skip

    monkeypatch.setattr(FinishedRuns, "KEPT", 3)
    monkeypatch.setattr(FinishedRuns, "KEPT_BYTES", 64 * 1000)
    kept = FinishedRuns()
    for n in range(5):
        kept.add(summary(f"r{n}", n))
    # The last three, by count.
    assert [kept.get(f"r{n}") is not None for n in range(5)] == [0, 0, 1, 1, 1]
    # A result over a 64th of the budget is not kept (the journal has it).
    kept.add(summary("big", "x" * 2000))
    assert kept.get("big") is None and kept.get("r4") is not None
    # Results up to the budget in all (here 70 of about 900 bytes): older go.
    monkeypatch.setattr(FinishedRuns, "KEPT", 1000)
    for n in range(100):
        kept.add(summary(f"part{n}", "y" * 700))
    assert [n for n in range(100) if kept.get(f"part{n}")] == list(range(30, 100))
    assert kept.get("r4") is None
    # A run finished again replaces its summary; a reopened one is dropped.
    kept.add(summary("part99", "again"))
    again = kept.get("part99")
    assert again is not None and again.result == "again"
    kept.drop("part99")
    assert kept.get("part99") is None


def test_a_wait_after_a_retry_waits_for_the_new_attempt(tmp_path: Path) -> None:
    asyncio.run(_retried(tmp_path))


async def _retried(tmp_path: Path) -> None:
    # The summary kept for a finished run must not answer a wait once the
    # run was retried: the wait is for the retry's outcome.
    side, flag = tmp_path / "side.txt", tmp_path / "flag"
    args = {"side_file": str(side), "tag": "t", "flag": str(flag)}
    async with (
        _serving(tmp_path) as (_, supervisor, client),
        asyncio.timeout(60),
    ):
        run_id = await client.submit("flaky", args)
        with pytest.raises(RunFailedError):
            await client.result(run_id)
        assert supervisor.finished.get(run_id) is not None
        flag.touch()
        assert await client.retry(run_id, "the flag is set")
        assert await client.result(run_id) == {
            "prepare": "prepared t",
            "check": "flag set",
        }
        kept = supervisor.finished.get(run_id)
        assert kept is not None and kept.status == "completed"
