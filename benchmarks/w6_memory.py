"""W6: the supervisor's memory after 10,000 and after 200,000 finished runs.

One-task no-op runs go through one `coda run` in waves of 2,000 submitted at
once; the supervisor's resident memory (VmRSS) is read when 10,000 and when
200,000 runs have finished. Finished runs should leave nothing behind in the
supervisor, so the target is growth within 10 % between the two readings.

At each reading the supervisor is also asked (SIGUSR1, `apps/probe.py`) what
its memory is made of: SQLite's own allocations (`sqlite3_memory_used`: the
writer's and the reader's page caches, mostly) and the live Python objects.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from benchmarks import peers
from benchmarks.harness import CodaServer, submit_all, temp_dir, wait_all
from benchmarks.workload import Metric, Metrics, Workload

EARLY, LATE = 10_000, 200_000
QUICK_EARLY, QUICK_LATE = 2_000, 10_000
WAVE = 2_000


async def measure(system: str, quick: bool) -> Metrics:
    early, late = (QUICK_EARLY, QUICK_LATE) if quick else (EARLY, LATE)
    if system != "coda":
        return await peers.run(system, "W6", quick=quick, early=early, late=late)
    readings: dict[int, float] = {}
    probes: dict[int, dict[str, float]] = {}
    with temp_dir("w6") as tmp:
        probe = tmp / "probe.json"
        env = {"CODA_BENCH_PROBE": str(probe)}
        async with CodaServer(tmp / "coda.db", extra_env=env) as server:
            client = await server.client()
            try:
                started = time.perf_counter()
                done = 0
                while done < late:
                    wave = min(WAVE, late - done)
                    if done < early:
                        wave = min(wave, early - done)
                    ids = await submit_all(client, "one_task", [{}] * wave)
                    await wait_all(client, ids)
                    done += wave
                    if done in (early, late):
                        readings[done] = server.memory()["rss"]
                        probes[done] = await ask_probe(server.pid, probe)
                elapsed = time.perf_counter() - started
            finally:
                await client.close()
    out = figures(readings[early], readings[late], late / elapsed)
    for at, label in ((early, "early"), (late, "late")):
        for key, value in probes[at].items():
            out[f"{key}_{label}"] = value
    return out | {"count": late}


async def ask_probe(pid: int, path: Path) -> dict[str, float]:
    """What the supervisor's memory is made of, from its SIGUSR1 probe."""
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    for _ in range(200):
        if path.exists():
            snap = json.loads(path.read_text())
            return {
                "sqlite_mb": snap["sqlite_bytes"] / 2**20,
                "py_objects_k": snap["gc_objects"] / 1000,
            }
        await asyncio.sleep(0.05)
    return {}


def figures(early_mb: float, late_mb: float, runs_per_s: float) -> Metrics:
    return {
        "rss_early_mb": early_mb,
        "rss_late_mb": late_mb,
        "growth_pct": (late_mb - early_mb) / early_mb * 100,
        "runs_per_s": runs_per_s,
    }


WORKLOAD = Workload(
    name="W6",
    title=f"supervisor memory after {EARLY:,} and {LATE:,} finished runs",
    metrics=(
        Metric("rss_early_mb", f"RSS MB after {EARLY:,}", False),
        Metric("rss_late_mb", f"RSS MB after {LATE:,}", False),
        Metric("growth_pct", "growth %", False, target=("<=", 10.0), ratio=False),
        Metric("sqlite_mb_early", f"of which SQLite MB after {EARLY:,}", False),
        Metric("sqlite_mb_late", f"of which SQLite MB after {LATE:,}", False),
        Metric("py_objects_k_early", f"Python objects (k) after {EARLY:,}", False),
        Metric("py_objects_k_late", f"Python objects (k) after {LATE:,}", False),
        Metric("runs_per_s", "runs/s (waves of 2,000)"),
    ),
    measure=measure,
    not_applicable={
        peer: "not measured: at the rates this machine gives it (see W2), "
        f"{LATE:,} runs would take {hours} per repeat"
        for peer, hours in (
            ("dbos", "about 4 hours"),
            ("dbos-wal", "about 30 minutes"),
            ("huey", "about 50 minutes"),
        )
    },
)
