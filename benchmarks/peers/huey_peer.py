"""Huey on SqliteHuey, driven like Coda: `python -m benchmarks.peers.huey_peer W1`.

The consumer is `huey_consumer` in a subprocess with two worker processes
(`-k process -w 2`, as Coda's `coda run` has two workers on this machine). Its
queue polling is tightened from the defaults (0.1 s first, backing off to
10 s when idle) to 1 ms backing off to 10 ms (`-d 0.001 -m 0.01`), and the
client polls for results every 0.5 ms (W3) or 2 ms (bulk), so that no figure
is a polling interval. This process enqueues and waits for results.

* W1: the pipeline `normalize.s(...).then(symbolicate, 1).then(store, 1, path)`
  per event, all enqueued at once; the run's result is the store's.
* W2: no-op tasks, all enqueued at once.
* W3: one no-op task at a time, enqueue to result.
* W6: RSS of the consumer (its main process plus its workers) after
  `--early` and `--late` no-op tasks, enqueued in waves of 2,000.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO, children_of, memory_mb, percentile, python_env
from benchmarks.peers.common import emit, parse

WORKERS = 2
LIMIT_S = 900.0


def start_consumer(db: Path) -> subprocess.Popen[bytes]:
    env = python_env() | {"CODA_BENCH_HUEY_DB": str(db)}
    command = [
        sys.executable,
        "-m",
        "huey.bin.huey_consumer",
        "benchmarks.apps.huey_app.huey",
        "-k",
        "process",
        "-w",
        str(WORKERS),
        "-d",
        "0.001",
        "-m",
        "0.01",
        "-n",
        "-q",
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(db.with_suffix(".log"), "wb"),
    )


def stop_consumer(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            for pid in children_of(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait(10)


def tree_rss(pid: int) -> float:
    return sum(memory_mb(p)["rss"] for p in [pid, *children_of(pid)])


def main() -> None:
    args = parse()
    with tempfile.TemporaryDirectory(prefix="coda-bench-huey-") as tmp:
        db = Path(tmp) / "huey.db"
        os.environ["CODA_BENCH_HUEY_DB"] = str(db)
        from benchmarks.apps import huey_app, work

        huey = huey_app.huey
        consumer = start_consumer(db)
        try:
            # Warm up: the consumer is up once a task comes back.
            huey_app.noop().get(blocking=True, timeout=60, max_delay=0.002)
            if args.workload == "W1":
                store = str(Path(tmp) / "store.db")
                events = [work.make_event(i) for i in range(args.runs)]
                started = time.perf_counter()
                groups = [
                    huey.enqueue(
                        huey_app.normalize_event.s(1, event)
                        .then(huey_app.symbolicate_event, 1)
                        .then(huey_app.store_event, 1, store)
                    )
                    for event in events
                ]
                for group in groups:
                    group.get(blocking=True, timeout=LIMIT_S, max_delay=0.002)
                elapsed = time.perf_counter() - started
                emit(
                    {
                        "runs_per_s": args.runs / elapsed,
                        "tasks_per_s": args.runs * 3 / elapsed,
                        "seconds": elapsed,
                    }
                )
            elif args.workload == "W2":
                started = time.perf_counter()
                results = [huey_app.noop() for _ in range(args.runs)]
                for result in results:
                    result.get(blocking=True, timeout=LIMIT_S, max_delay=0.002)
                elapsed = time.perf_counter() - started
                emit({"runs_per_s": args.runs / elapsed, "seconds": elapsed})
            elif args.workload == "W3":
                samples = []
                for i in range(20 + args.runs):
                    started = time.perf_counter()
                    huey_app.noop().get(blocking=True, timeout=60, max_delay=0.0005)
                    if i >= 20:
                        samples.append(time.perf_counter() - started)
                emit(
                    {
                        "p50_ms": percentile(samples, 50) * 1000,
                        "p99_ms": percentile(samples, 99) * 1000,
                        "mean_ms": sum(samples) / len(samples) * 1000,
                    }
                )
            elif args.workload == "W6":
                readings, done = {}, 0
                started = time.perf_counter()
                while done < args.late:
                    wave = min(2000, args.late - done)
                    if done < args.early:
                        wave = min(wave, args.early - done)
                    results = [huey_app.noop() for _ in range(wave)]
                    for result in results:
                        result.get(blocking=True, timeout=LIMIT_S, max_delay=0.002)
                    done += wave
                    if done in (args.early, args.late):
                        readings[done] = tree_rss(consumer.pid)
                elapsed = time.perf_counter() - started
                early, late = readings[args.early], readings[args.late]
                emit(
                    {
                        "rss_early_mb": early,
                        "rss_late_mb": late,
                        "growth_pct": (late - early) / early * 100,
                        "runs_per_s": args.late / elapsed,
                    }
                )
            else:
                raise SystemExit(f"huey has no workload {args.workload}")
        finally:
            stop_consumer(consumer)


if __name__ == "__main__":
    main()
