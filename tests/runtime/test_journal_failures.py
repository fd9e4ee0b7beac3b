"""A journal that refuses appends for a while (a full disk) stops nothing for good.

The supervisor runs in this process, on a journal that fails every append while
`full` is set, with real worker processes. While the disk is full, submissions
are refused and nothing acknowledged is lost; once there is room again, every
acknowledged run finishes and new runs go through, without a restart.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from coda.definitions import Registry, load_app
from coda.errors import JournalError
from coda.runtime.supervisor import Supervisor

from .support import APP, APPS, FillingJournal, base_env


async def _scenario(path: Path) -> None:
    journal = await FillingJournal.open(path)
    registry: Registry = load_app(APP)
    supervisor = Supervisor(journal, APP, registry, workers=2, worker_env=base_env())
    await supervisor.start()
    try:
        acked = []
        for i in range(30):
            run_id, _ = await supervisor.submit("quick", {"x": i}, f"before-{i}")
            acked.append(run_id)

        # The disk fills while those runs are in flight.
        journal.full = True
        refused = 0
        for i in range(20):
            try:
                await supervisor.submit("quick", {"x": i}, f"during-{i}")
            except JournalError:
                refused += 1
        await asyncio.sleep(1.5)
        assert refused == 20

        # Room again: what was acknowledged finishes, and new work goes through.
        journal.full = False
        for i in range(10):
            run_id, _ = await supervisor.submit("quick", {"x": i}, f"after-{i}")
            acked.append(run_id)
        try:
            async with asyncio.timeout(30):
                summaries = await asyncio.gather(*(supervisor.wait(r) for r in acked))
        except TimeoutError:
            for run in supervisor.runs.values():
                print(
                    "STUCK",
                    run.run_id,
                    run.state.status,
                    run.durable,
                    run.state.next_seq,
                    run.host and run.host.name,
                    run.activating,
                    [
                        (s.step, s.status, s.try_number)
                        for s in run.state.steps.values()
                    ],
                    run.outbox,
                )
            for w in supervisor.pool.workers:
                print(
                    "WORKER", w.name, w.alive, w.exclusive, list(w.tries), len(w.hosted)
                )
            dispatcher = supervisor.dispatcher
            print("READY", list(dispatcher._ready)[:10], len(dispatcher._queued))
            raise
        results = {}
        for run_id, summary in zip(acked, summaries, strict=True):
            found = summary or await journal.run(run_id)
            assert found is not None, run_id
            assert found.status == "completed", (run_id, found)
            results[run_id] = found.result
        assert results["before-7"] == 2 * 7 + 1
        assert results["after-3"] == 2 * 3 + 1
        for i in range(20):
            assert await journal.run(f"during-{i}") is None
        assert await journal.integrity_problems() == []
    finally:
        await supervisor.stop()
        await journal.close()


def test_a_full_disk_refuses_new_work_and_loses_nothing(tmp_path: Path) -> None:
    sys.path.insert(0, str(APPS))
    try:
        asyncio.run(_scenario(tmp_path / "coda.db"))
    finally:
        sys.path.remove(str(APPS))
