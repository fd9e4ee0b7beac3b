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


async def run(system: str, workload: str, **counts: Any) -> dict[str, float]:
    module, extra = SYSTEMS[system]
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
    return figures
