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
from pathlib import Path

import pytest

from coda.definitions import load_app
from coda.errors import UnknownNameError
from coda.runtime.client import Client, RequestError
from coda.runtime.server import ClientServer
from coda.runtime.supervisor import Supervisor

from .support import APP, APPS, FillingJournal, base_env


@pytest.fixture(autouse=True)
def _app_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))


def test_submit_and_wait_answered_by_callbacks(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))


async def _scenario(tmp_path: Path) -> None:
    journal = await FillingJournal.open(tmp_path / "coda.db")
    supervisor = Supervisor(
        journal, APP, load_app(APP), workers=1, worker_env=base_env()
    )
    server = ClientServer(supervisor, socket_path=tmp_path / "s.sock")
    await supervisor.start()
    await server.start()
    client = await Client.connect(tmp_path / "s.sock")
    try:
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
    finally:
        await client.close()
        await server.close()
        await supervisor.stop()
        await journal.close()
