"""Readers beside a writer at full speed: do they disturb it, does it lock them out?

A burst of runs is submitted all at once to a `coda run`, and the time until
the last completes is measured, with the completions' progress sampled every
20 ms through the supervisor's `stats` (a socket request: it reads nothing
from the journal). Then the same burst again while readers loop on the same
journal file: `coda history` and `coda ls` as subprocesses, and a thread that
reads histories and run lists through `read_history_sync` / `read_runs_sync`
back to back. Every reader call must succeed and none may print "database is
locked".

Reported, not asserted (timing on a shared machine proves little): the
completions per second with and without readers, and the longest stretch with
no completion at all, which is what a writer stalled behind a reader's lock
would show.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
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
    coda: Coda, command: str, ids: list[str], stop: threading.Event, out: Readers
) -> None:
    rng = random.Random(command)
    while not stop.is_set():
        if command == "history":
            args = ["history", rng.choice(ids), "--journal", str(coda.journal)]
        else:
            args = ["ls", "--journal", str(coda.journal)]
        done = coda.cli(*args)
        out.cli_calls += 1
        text = done.stdout + done.stderr
        if done.returncode != 0 or "locked" in text:
            out.cli_failures.append(
                f"coda {' '.join(args)} -> {done.returncode}: {text}"
            )


def _direct_loop(
    coda: Coda, ids: list[str], stop: threading.Event, out: Readers
) -> None:
    rng = random.Random("direct")
    while not stop.is_set():
        try:
            read_history_sync(coda.journal, rng.choice(ids))
            read_runs_sync(coda.journal, limit=100)
        except Exception as exc:
            out.direct_failures.append(repr(exc))
        out.direct_reads += 1


def measure(coda: Coda, runs: int, cli_calls: int = 10) -> dict[str, Any]:
    """A burst alone, then bursts with readers until they made `cli_calls` calls."""
    asyncio.run(_burst(coda, "warm", min(runs, 200)))  # workers warmed up, caches
    quiet, ids = asyncio.run(_burst(coda, "quiet", runs))
    readers = Readers()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_cli_loop, args=(coda, "history", ids, stop, readers)),
        threading.Thread(target=_cli_loop, args=(coda, "ls", ids, stop, readers)),
        threading.Thread(target=_direct_loop, args=(coda, ids, stop, readers)),
    ]
    for thread in threads:
        thread.start()
    bursts: list[Burst] = []
    try:
        while not bursts or readers.cli_calls < cli_calls:
            burst, _ = asyncio.run(_burst(coda, f"busy{len(bursts)}", runs))
            bursts.append(burst)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    busy = Burst(
        sum(b.runs for b in bursts),
        sum(b.seconds for b in bursts),
        max(b.longest_stall for b in bursts),
    )
    return {"quiet": quiet, "busy": busy, "readers": readers}


def describe(figures: dict[str, Any]) -> str:
    quiet, busy, readers = figures["quiet"], figures["busy"], figures["readers"]
    return (
        f"without readers: {quiet.runs} runs in {quiet.seconds:.2f} s "
        f"({quiet.per_second:.0f} runs/s), longest stall {quiet.longest_stall:.3f} s; "
        f"with readers: {busy.runs} runs in {busy.seconds:.2f} s "
        f"({busy.per_second:.0f} runs/s), longest stall {busy.longest_stall:.3f} s; "
        f"readers: {readers.cli_calls} coda history/ls calls, "
        f"{readers.direct_reads} direct reads, "
        f"{len(readers.cli_failures) + len(readers.direct_failures)} failures"
    )
