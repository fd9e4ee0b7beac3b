"""W3: latency of one one-task workflow, submit to result, on an idle system.

1,000 runs one after the other, each timed from the client's submit to the
client holding its result (`Client.run`: submit and wait in one round trip
on one open connection). A few runs first, untimed, to warm up.
"""

from __future__ import annotations

import time

from benchmarks import peers
from benchmarks.harness import CodaServer, percentile, temp_dir
from benchmarks.workload import Metric, Metrics, Workload

RUNS, QUICK_RUNS = 1000, 200
WARMUP = 20


async def measure(system: str, quick: bool) -> Metrics:
    runs = QUICK_RUNS if quick else RUNS
    if system != "coda":
        return await peers.run(system, "W3", quick=quick, runs=runs)
    samples: list[float] = []
    with temp_dir("w3") as tmp:
        async with CodaServer(tmp / "coda.db") as server:
            client = await server.client()
            try:
                for i in range(WARMUP + runs):
                    started = time.perf_counter()
                    await client.run("one_task", {}, timeout=30)
                    if i >= WARMUP:
                        samples.append(time.perf_counter() - started)
            finally:
                await client.close()
    return latency_figures(samples) | {"count": runs}


def latency_figures(samples: list[float]) -> Metrics:
    return {
        "p50_ms": percentile(samples, 50) * 1000,
        "p99_ms": percentile(samples, 99) * 1000,
        "mean_ms": sum(samples) / len(samples) * 1000,
    }


WORKLOAD = Workload(
    name="W3",
    title=f"latency of one one-task workflow, {RUNS:,} sequential runs",
    metrics=(
        Metric("p50_ms", "p50 ms", higher_is_better=False, target=("<=", 2.0)),
        Metric("p99_ms", "p99 ms", higher_is_better=False, target=("<=", 10.0)),
        Metric("mean_ms", "mean ms", higher_is_better=False),
    ),
    measure=measure,
)
