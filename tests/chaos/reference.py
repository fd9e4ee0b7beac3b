"""The crash-free reference: the same runs, once each, with `LocalRunner`.

Every run of the workload is done in this process on a journal of its own,
with no supervisor, no worker and no crash, and with no delays (the results do
not depend on them). Its outcome is what the chaos run must end with.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from coda import LocalRunner, RunFailedError
from coda.journal.sqlite import SQLiteJournal
from tests.chaos import chaos_app  # noqa: F401  (registers the app)
from tests.chaos.workload import Submission, args_for

# ("completed", result) or ("failed", error type).
Outcome = tuple[str, Any]


async def reference_outcomes(
    workload: list[Submission], workdir: Path
) -> dict[str, Outcome]:
    workdir.mkdir(parents=True, exist_ok=True)
    counters = workdir / "reference-counters"
    counters.mkdir(exist_ok=True)
    side = workdir / "reference-side.log"
    journal = await SQLiteJournal.open(workdir / "reference.db", synchronous="OFF")
    runner = LocalRunner(journal)
    room = asyncio.Semaphore(64)

    async def one(submission: Submission) -> Outcome:
        args = args_for(submission, side, counters) | {"delay": 0.0}
        async with room:
            try:
                result = await runner.run(
                    submission.workflow, args, run_id=submission.run_id
                )
            except RunFailedError as exc:
                return ("failed", exc.error_type)
        return ("completed", result)

    try:
        outcomes = await asyncio.gather(*(one(s) for s in workload))
    finally:
        await runner.close()
    return {s.run_id: o for s, o in zip(workload, outcomes, strict=True)}


def compute_reference(workload: list[Submission], workdir: Path) -> dict[str, Outcome]:
    return asyncio.run(reference_outcomes(workload, workdir))
