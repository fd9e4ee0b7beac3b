"""W2: 5,000 one-task no-op workflows, all submitted at once: runs/s.

The clock starts before the first submission and stops when the last run's
result is known to the client (each run: submitted, attempt started, task
scheduled, started and completed, run completed: six durable events).
"""

from __future__ import annotations

import time

from benchmarks import peers
from benchmarks.harness import CodaServer, submit_all, temp_dir, wait_all
from benchmarks.workload import Metric, Metrics, Workload

RUNS, QUICK_RUNS = 5000, 500


async def measure(system: str, quick: bool) -> Metrics:
    runs = QUICK_RUNS if quick else RUNS
    if system != "coda":
        return await peers.run(system, "W2", quick=quick, runs=runs)
    with temp_dir("w2") as tmp:
        async with CodaServer(tmp / "coda.db") as server:
            client = await server.client()
            try:
                started = time.perf_counter()
                ids = await submit_all(client, "one_task", [{}] * runs)
                await wait_all(client, ids)
                elapsed = time.perf_counter() - started
            finally:
                await client.close()
    return {"runs_per_s": runs / elapsed, "seconds": elapsed, "count": runs}


WORKLOAD = Workload(
    name="W2",
    title=f"{RUNS:,} one-task no-op workflows, submitted at once",
    metrics=(
        Metric("runs_per_s", "runs/s", target=(">=", 5000)),
        Metric("seconds", "seconds", higher_is_better=False, ratio=False),
    ),
    measure=measure,
)
