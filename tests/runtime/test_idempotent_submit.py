"""Two clients submitting the same run ids at the same time."""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

from coda.journal.events import AttemptStarted, RunSubmitted, TaskStarted
from coda.runtime.client import Client

from .support import CodaProcess

RUN_IDS = [f"same-{n:02d}" for n in range(20)]
STEPS = 2


def test_concurrent_submits_of_one_id_make_one_run(coda: CodaProcess) -> None:
    side = coda.workdir / "side-effects"

    async def submit_all(client: Client) -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(
                client.request(
                    "submit",
                    workflow="chain",
                    args={
                        "side_file": str(side),
                        "tag": run_id,
                        "steps": STEPS,
                        "delay": 0.01,
                    },
                    run_id=run_id,
                )
                for run_id in RUN_IDS
            )
        )

    async def scenario() -> tuple[list[Any], list[Any], dict[str, Any]]:
        first = await Client.connect(coda.socket)
        second = await Client.connect(coda.socket)
        try:
            async with asyncio.timeout(30):
                one, two = await asyncio.gather(submit_all(first), submit_all(second))
            results = await asyncio.gather(
                *(first.result(r, timeout=20) for r in RUN_IDS),
                *(second.result(r, timeout=20) for r in RUN_IDS),
            )
            return one, two, dict(zip(RUN_IDS * 2, results, strict=True))
        finally:
            await first.close()
            await second.close()

    one, two, results = asyncio.run(scenario())

    # Both clients are given the same run, and exactly one of them created it.
    assert [r["run_id"] for r in one] == RUN_IDS
    assert [r["run_id"] for r in two] == RUN_IDS
    assert [a["created"] + b["created"] for a, b in zip(one, two, strict=True)] == [
        1
    ] * len(RUN_IDS)
    assert results == {
        r: {"tag": r, "results": [i * i for i in range(STEPS)]} for r in RUN_IDS
    }

    listed = coda.cli("ls", "--json", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    runs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(r["run_id"] for r in runs) == RUN_IDS
    assert {r["status"] for r in runs} == {"completed"}
    for run_id in RUN_IDS:
        history = coda.history(run_id)
        kinds = collections.Counter(type(e).__name__ for e in history)
        assert kinds[RunSubmitted.__name__] == 1
        assert kinds[AttemptStarted.__name__] == 1
        assert kinds[TaskStarted.__name__] == STEPS

    # Each task of each run ran once.
    lines = (coda.workdir / "side-effects").read_text().splitlines()
    assert sorted(lines) == sorted(f"{r} {i}" for r in RUN_IDS for i in range(STEPS))
