"""W1: 2,000 runs of the example's three-task workflow, all submitted at once.

Each run normalizes a small native event, symbolicates it and stores it
idempotently in a SQLite file (`benchmarks.apps.work`, the example's own
functions). Figures: runs/s and tasks/s (three tasks a run), from the first
submission to the last result.
"""

from __future__ import annotations

import time

from benchmarks import peers
from benchmarks.apps.work import make_event
from benchmarks.harness import CodaServer, submit_all, temp_dir, wait_all
from benchmarks.workload import Metric, Metrics, Workload

RUNS, QUICK_RUNS = 2000, 200
TASKS_PER_RUN = 3


async def measure(system: str, quick: bool) -> Metrics:
    runs = QUICK_RUNS if quick else RUNS
    if system != "coda":
        return await peers.run(system, "W1", quick=quick, runs=runs)
    with temp_dir("w1") as tmp:
        store = str(tmp / "store.db")
        args = [
            {"project_id": 1, "event_data": make_event(i), "store_path": store}
            for i in range(runs)
        ]
        async with CodaServer(tmp / "coda.db") as server:
            client = await server.client()
            try:
                started = time.perf_counter()
                ids = await submit_all(client, "pipeline", args)
                await wait_all(client, ids)
                elapsed = time.perf_counter() - started
            finally:
                await client.close()
    return figures(runs, elapsed)


def figures(runs: int, elapsed: float) -> Metrics:
    return {
        "runs_per_s": runs / elapsed,
        "tasks_per_s": runs * TASKS_PER_RUN / elapsed,
        "seconds": elapsed,
        "count": runs,
    }


WORKLOAD = Workload(
    name="W1",
    title=f"{RUNS:,} runs of the three-task pipeline, submitted at once",
    metrics=(
        Metric("runs_per_s", "runs/s", target=(">=", 2000)),
        Metric("tasks_per_s", "tasks/s"),
        Metric("seconds", "seconds", higher_is_better=False, ratio=False),
    ),
    measure=measure,
)
