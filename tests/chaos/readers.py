"""Readers beside a writer at full speed: do they disturb it, does it lock them out?

A burst of runs is submitted all at once to a `coda run`, and the time until
the last completes is measured, with the completions' progress sampled every
20 ms through the supervisor's `stats` (a socket request: it reads nothing
from the journal). Three phases, each of bursts until the readers made
enough calls:

* quiet: no readers;
* control: readers on a *copy* of the journal: `coda history` and `coda ls`
  as subprocesses in a loop, and a thread reading histories and run lists
  through `read_history_sync` / `read_runs_sync`, paced. Same processes, same
  work, same CPU, but not the writer's file;
* readers: the same readers on the live journal.

Every reader call must succeed and none may print "database is locked".

Reported, not asserted (timing on a shared machine proves little): the
completions per second of each phase, and the longest stretch with no
completion at all, which is what a writer stalled behind a reader's lock
would show. The difference between control and readers is the readers'
effect on the writer; between quiet and control, the cost of sharing the
processors.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coda.journal.sqlite import read_history_sync, read_runs_sync
from coda.runtime.client import Client
from tests.chaos.procs import Coda


@dataclass
class Burst:
    runs: int
    seconds: float
    longest_stall: float  # seconds without a completion, once the first came

    @property
    def per_second(self) -> float:
        return self.runs / self.seconds


@dataclass
class Readers:
    cli_calls: int = 0
    cli_failures: list[str] = field(default_factory=list)
    direct_reads: int = 0
    direct_failures: list[str] = field(default_factory=list)


async def _burst(coda: Coda, tag: str, runs: int) -> tuple[Burst, list[str]]:
    side = coda.workdir / f"side-{tag}.log"
    counters = coda.workdir / "counters"
    counters.mkdir(exist_ok=True)
    client = await Client.connect(coda.socket)
    try:
        before = (await client.stats())["completed"]
        started = time.monotonic()
        ids = await asyncio.gather(
            *(
                client.submit(
                    "sequence",
                    {
                        "side": str(side),
                        "counters": str(counters),
                        "seed": i,
                        "delay": 0.0,
                        "length": 2,
                    },
                    run_id=f"{tag}-{i:05d}",
                )
                for i in range(runs)
            )
        )
        done, last_change, stall = 0, None, 0.0
        while done < runs:
            await asyncio.sleep(0.02)
            now_done = (await client.stats())["completed"] - before
            now = time.monotonic()
            if now_done != done:
                if last_change is not None:
                    stall = max(stall, now - last_change)
                last_change, done = now, now_done
            elif now - started > 300:
                raise AssertionError(f"burst {tag}: {done}/{runs} done after 300 s")
        return Burst(runs, time.monotonic() - started, stall), ids
    finally:
        await client.close()


def _cli_loop(
    coda: Coda,
    journal: Path,
    command: str,
    ids: list[str],
    stop: threading.Event,
    out: Readers,
) -> None:
    rng = random.Random(command)
    while not stop.is_set():
        if command == "history":
            args = ["history", rng.choice(ids), "--journal", str(journal)]
        else:
            args = ["ls", "--journal", str(journal)]
        done = coda.cli(*args)
        out.cli_calls += 1
        text = done.stdout + done.stderr
        if done.returncode != 0 or "locked" in text:
            out.cli_failures.append(
                f"coda {' '.join(args)} -> {done.returncode}: {text}"
            )


def _direct_loop(
    journal: Path, ids: list[str], stop: threading.Event, out: Readers
) -> None:
    rng = random.Random("direct")
    while not stop.is_set():
        try:
            read_history_sync(journal, rng.choice(ids))
            read_runs_sync(journal, limit=100)
        except Exception as exc:
            out.direct_failures.append(repr(exc))
        out.direct_reads += 1
        time.sleep(0.005)


def _phase(
    coda: Coda, tag: str, runs: int, journal: Path | None, ids: list[str], calls: int
) -> tuple[Burst, Readers]:
    """Bursts, with readers on `journal` (None: no readers) until `calls` calls."""
    readers = Readers()
    stop = threading.Event()
    threads = []
    if journal is not None:
        threads = [
            threading.Thread(
                target=_cli_loop, args=(coda, journal, name, ids, stop, readers)
            )
            for name in ("history", "ls")
        ]
        threads.append(
            threading.Thread(target=_direct_loop, args=(journal, ids, stop, readers))
        )
    for thread in threads:
        thread.start()
    bursts: list[Burst] = []
    try:
        while not bursts or (threads and readers.cli_calls < calls):
            burst, _ = asyncio.run(_burst(coda, f"{tag}{len(bursts)}", runs))
            bursts.append(burst)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    total = Burst(
        sum(b.runs for b in bursts),
        sum(b.seconds for b in bursts),
        max(b.longest_stall for b in bursts),
    )
    return total, readers


def measure(coda: Coda, runs: int, cli_calls: int = 10) -> dict[str, Any]:
    """Quiet, control and readers phases (see the module's docstring)."""
    _, ids = asyncio.run(_burst(coda, "warm", runs))  # workers and caches warm
    copy = coda.workdir / "copy.db"
    with (
        closing(sqlite3.connect(f"{coda.journal.as_uri()}?mode=ro", uri=True)) as src,
        closing(sqlite3.connect(copy)) as dst,
    ):
        src.backup(dst)
    quiet, _ = _phase(coda, "quiet", runs, None, ids, cli_calls)
    control, control_readers = _phase(coda, "control", runs, copy, ids, cli_calls)
    busy, readers = _phase(coda, "busy", runs, coda.journal, ids, cli_calls)
    return {
        "quiet": quiet,
        "control": control,
        "busy": busy,
        "control_readers": control_readers,
        "readers": readers,
    }


def describe(figures: dict[str, Any]) -> str:
    readers = figures["readers"]
    parts = [
        f"{name}: {b.runs} runs in {b.seconds:.2f} s ({b.per_second:.0f} runs/s, "
        f"longest stall {b.longest_stall * 1000:.0f} ms)"
        for name, b in (
            ("quiet", figures["quiet"]),
            ("readers on a copy", figures["control"]),
            ("readers on the journal", figures["busy"]),
        )
    ]
    failures = len(readers.cli_failures) + len(readers.direct_failures)
    parts.append(
        f"readers on the journal: {readers.cli_calls} coda history/ls calls, "
        f"{readers.direct_reads} direct reads, {failures} failures"
    )
    return "; ".join(parts)
