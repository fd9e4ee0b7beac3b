"""Profile Coda under W1 or W2 with py-spy: `python -m benchmarks.profile W2`.

Starts `coda run` as the workloads do, attaches `py-spy record --subprocesses
--format raw` to the supervisor (its workers included), runs the workload's
Coda part, and prints the top functions by self and by total samples, for the
supervisor and for the workers apart. Idle time (a thread blocked in a
selector, a lock or a queue) is not sampled (py-spy's default), so the shares
are of CPU time. Needs `pip install py-spy` and the right to ptrace children
(root, or kernel.yama.ptrace_scope = 0).

    python -m benchmarks.profile W1 --runs 2000 --out /tmp/w1.raw
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.apps.work import make_event
from benchmarks.harness import CodaServer, submit_all, temp_dir, wait_all

__all__ = ["main", "summarize"]


# Leaves where a thread waits for work rather than doing it. py-spy counts some
# of them as active (a thread blocked on a queue's lock, in waitpid, in epoll).
IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py:81)",
    # A worker's try threads waiting for a try.
    "_TryThreads._serve (coda/runtime/worker.py",
    "_connection_worker_thread (aiosqlite/core.py:59)",
    "EpollSelector.select (selectors.py",
    "ThreadedChildWatcher._do_waitpid",
)


def _short(frame: str, keep_line: bool) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)".
    name, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    for marker in ("site-packages/", "src/", "python3.11/", "benchmarks/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path}:{line})" if keep_line else f"{name} ({path})"


def summarize(raw: Path, top: int = 15) -> str:
    """Top functions by self and total samples, per process kind, idle left out."""
    selfs: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    totals: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    samples: collections.Counter[str] = collections.Counter()
    idle: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        processes = [f for f in frames if f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("process ")]
        kind = (
            "worker"
            if processes and "coda.runtime.worker" in processes[-1]
            else "supervisor"
        )
        if not frames:
            continue
        if any(frames[-1].startswith(leaf) for leaf in IDLE_LEAVES):
            idle[kind] += count
            continue
        samples[kind] += count
        selfs[kind][_short(frames[-1], True)] += count
        for name in {_short(f, False) for f in frames}:
            totals[kind][name] += count
    out = []
    for kind in ("supervisor", "worker"):
        n = samples[kind]
        if not n:
            continue
        out.append(
            f"== {kind}: {n} busy samples ({idle[kind]} idle left out), "
            "all its processes and threads =="
        )
        out.append("-- by self --")
        for name, c in selfs[kind].most_common(top):
            out.append(f"{100 * c / n:5.1f}%  {name}")
        out.append("-- by total --")
        for name, c in totals[kind].most_common(top * 3):
            out.append(f"{100 * c / n:5.1f}%  {name}")
    return "\n".join(out)


def _py_spy(raw: Path, rate: int, *target: str) -> list[str]:
    """`py-spy record` of `target` (`--pid N`, or `-- command...`), raw stacks."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    options = ["--subprocesses", "--format", "raw", "--rate", str(rate)]
    return [py_spy, "record", *options, "--output", str(raw), *target]


async def _workload(name: str, runs: int, raw: Path, rate: int) -> float:
    with temp_dir("profile") as tmp:
        async with CodaServer(tmp / "coda.db") as server:
            client = await server.client()
            spy = subprocess.Popen(
                _py_spy(raw, rate, "--pid", str(server.pid)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                await asyncio.sleep(1.0)  # let py-spy attach
                if name == "W1":
                    store = str(tmp / "store.db")
                    args = [
                        {
                            "project_id": 1,
                            "event_data": make_event(i),
                            "store_path": store,
                        }
                        for i in range(runs)
                    ]
                    workflow = "pipeline"
                else:
                    args, workflow = [{}] * runs, "one_task"
                started = time.perf_counter()
                ids = await submit_all(client, workflow, args)
                await wait_all(client, ids)
                elapsed = time.perf_counter() - started
            finally:
                await client.close()
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
    return runs / elapsed


async def _recovery(raw: Path, rate: int) -> float:
    """W4 under py-spy from the first instruction: `coda run` is py-spy's child."""
    from benchmarks import journal_builder, w4_recovery
    from benchmarks.harness import REPO, python_env

    source = await asyncio.to_thread(
        journal_builder.cached_journal,
        w4_recovery.FINISHED_EVENTS,
        w4_recovery.UNFINISHED,
    )
    with temp_dir("profile-w4") as tmp:
        journal = journal_builder.fresh_copy(source, tmp)
        started = time.perf_counter()
        spy = subprocess.Popen(
            [
                *_py_spy(raw, rate, "--"),
                sys.executable,
                "-m",
                "coda",
                "run",
                "benchmarks.apps.coda_app",
                "--journal",
                str(journal),
                "--workers",
                "2",
            ],
            cwd=REPO,
            env=python_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = CodaServer(journal)
        try:
            deadline = time.monotonic() + 300
            while not server.socket.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            client = await server.client()
            try:
                while (await client.stats())["completed"] < w4_recovery.UNFINISHED:
                    if time.monotonic() > deadline:
                        raise RuntimeError("recovery did not finish under py-spy")
                    await asyncio.sleep(0.02)
                elapsed = time.perf_counter() - started
            finally:
                await client.close()
        finally:
            from benchmarks.harness import children_of

            for pid in children_of(spy.pid):  # the supervisor: stop it cleanly
                os.kill(pid, signal.SIGTERM)
            spy.wait(120)
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("workload", choices=["W1", "W2", "W4"])
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("profile.raw"))
    args = parser.parse_args(argv)
    if args.workload == "W4":
        elapsed = asyncio.run(_recovery(args.out, args.rate))
        print(f"W4: every unfinished run completed {elapsed:.1f}s after start")
    else:
        runs = args.runs or (2000 if args.workload == "W1" else 5000)
        rate = asyncio.run(_workload(args.workload, runs, args.out, args.rate))
        print(f"{args.workload}: {runs} runs at {rate:.0f} runs/s under py-spy")
    print(summarize(args.out))


if __name__ == "__main__":
    main()
