"""The peers Coda is measured beside, each driven in a subprocess of its own.

`run(system, workload, **counts)` starts `python -m benchmarks.peers.<peer>`
for one repeat of one workload and returns the figures it prints as its last
line of JSON. A fresh process per repeat keeps the peers' global state (DBOS
is a singleton per process) and memory figures apart.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from benchmarks.harness import REPO, python_env

__all__ = ["SYSTEMS", "run"]

# system -> (module, extra arguments)
SYSTEMS: dict[str, tuple[str, list[str]]] = {
    "dbos": ("benchmarks.peers.dbos_peer", []),
    "dbos-wal": ("benchmarks.peers.dbos_peer", ["--wal"]),
    "huey": ("benchmarks.peers.huey_peer", []),
}
TIMEOUT_S = 1800.0

# Counts for the slow peers in the full suite. On this machine an fsync takes
# ~4 ms, and DBOS (with its defaults) and Huey commit once or more per step, so
# the counts would take 5-20 minutes a repeat for each of them. Their
# counts are scaled down so that a repeat takes 10-40 s; the figures are rates
# (or latencies) in steady state, so they stay comparable. `--quick` never runs
# peers. The count used is reported with each figure as `count`.
SCALED: dict[tuple[str, str], dict[str, int]] = {
    ("dbos", "W1"): {"runs": 300},
    ("dbos", "W2"): {"runs": 500},
    ("dbos", "W3"): {"runs": 200},
    ("dbos", "W5"): {"tasks": 2000},
    ("dbos-wal", "W1"): {"runs": 1000},
    ("dbos-wal", "W2"): {"runs": 2000},
    ("dbos-wal", "W5"): {"tasks": 2000},
    ("huey", "W1"): {"runs": 300},
    ("huey", "W2"): {"runs": 1000},
}


async def run(
    system: str, workload: str, *, quick: bool = False, **counts: Any
) -> dict[str, float]:
    module, extra = SYSTEMS[system]
    if not quick:
        counts = counts | SCALED.get((system, workload), {})
    command = [sys.executable, "-m", module, workload, *extra]
    for key, value in counts.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=REPO,
        env=python_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"{system} {workload} ran past {TIMEOUT_S:.0f}s") from None
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(
            f"{system} {workload} failed (exit {process.returncode}): "
            f"{err.decode()[-3000:]}"
        )
    figures: dict[str, float] = json.loads(lines[-1])
    figures["count"] = next(iter(counts.values()))
    return figures
