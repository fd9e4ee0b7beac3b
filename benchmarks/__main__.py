"""Run the benchmark suite: `python -m benchmarks [--quick] [--only W1,W2] ...`.

Every workload is measured on Coda through `coda run` (real supervisor and
worker processes, `synchronous=FULL`) and, in the same invocation, on each
peer that has an equivalent: DBOS Transact on SQLite (its defaults, and WAL +
synchronous=NORMAL) and Huey on SqliteHuey. Repeats interleave the systems
(repeat 1 of every system, then repeat 2...), so that every ratio compares
figures taken on the same machine at about the same time.

Writes `results/latest.json` and the tables of `RESULTS.md` under `--out`
(default: this directory).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import (
    journal_append,
    report,
    w1_pipeline,
    w2_noop,
    w3_latency,
    w4_recovery,
    w5_replay,
    w6_memory,
)
from benchmarks.harness import machine_info, spread
from benchmarks.workload import Workload

WORKLOADS: list[Workload] = [
    w1_pipeline.WORKLOAD,
    w2_noop.WORKLOAD,
    w3_latency.WORKLOAD,
    w4_recovery.WORKLOAD,
    w5_replay.WORKLOAD,
    w6_memory.WORKLOAD,
    journal_append.WORKLOAD,
]
PEER_PACKAGES = {"dbos": "dbos", "dbos-wal": "dbos", "huey": "huey"}


def fsync_ms() -> float:
    """How long one committed one-row transaction takes at synchronous=FULL."""
    with (
        tempfile.TemporaryDirectory(prefix="coda-bench-fsync-") as tmp,
        contextlib.closing(
            sqlite3.connect(Path(tmp) / "f.db", isolation_level=None)
        ) as db,
    ):
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE t (x)")
        started = time.perf_counter()
        for i in range(100):
            db.execute("INSERT INTO t VALUES (?)", (i,))
        return (time.perf_counter() - started) / 100 * 1000


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts, 1 repeat, no peers (about a minute)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated workloads: " + ",".join(w.name for w in WORKLOADS),
    )
    parser.add_argument("--repeat", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--no-peers", action="store_true", help="measure Coda only")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other workloads of the existing results/latest.json",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="where results/latest.json and RESULTS.md go (default: benchmarks/)",
    )
    return parser.parse_args(argv)


async def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    only = {n.strip().lower() for n in args.only.split(",") if n.strip()}
    chosen = [w for w in WORKLOADS if not only or w.name.lower() in only]
    unknown = only - {w.name.lower() for w in WORKLOADS}
    if unknown:
        raise SystemExit(f"no such workload: {', '.join(sorted(unknown))}")
    repeat = args.repeat or (1 if args.quick else 3)
    with_peers = not args.no_peers and not args.quick
    missing = sorted(
        {p for p, pkg in PEER_PACKAGES.items() if importlib.util.find_spec(pkg) is None}
    )
    data: dict[str, Any] = {
        "machine": machine_info() | {"fsync_ms": fsync_ms()},
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "repeat": repeat,
        "quick": args.quick,
        "workloads": {},
    }
    for workload in chosen:
        systems: dict[str, dict[str, Any]] = {"coda": {"repeats": []}}
        for peer in workload.peers if with_peers else ():
            if peer in workload.not_applicable:
                systems[peer] = {"na": workload.not_applicable[peer]}
            elif peer in missing:
                systems[peer] = {
                    "na": "not installed (pip install -e '.[bench]')",
                }
            else:
                systems[peer] = {"repeats": []}
        for number in range(1, repeat + 1):
            for system, entry in systems.items():
                if "na" in entry:
                    continue
                label = f"{workload.name} {system} repeat {number}/{repeat}"
                print(f"{label} ...", file=sys.stderr, flush=True)
                started = time.perf_counter()
                try:
                    figures = await workload.measure(system, args.quick)
                except Exception as exc:
                    traceback.print_exc()
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                    continue
                figures["load1"] = os.getloadavg()[0]
                entry["repeats"].append(figures)
                shown = ", ".join(f"{k}={v:.4g}" for k, v in figures.items())
                print(
                    f"{label}: {shown} ({time.perf_counter() - started:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
        for entry in systems.values():
            repeats = entry.get("repeats")
            if repeats:
                keys = repeats[0].keys()
                entry["summary"] = {k: spread([r[k] for r in repeats]) for k in keys}
        data["workloads"][workload.name] = {
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "coda_commit": data["machine"]["coda_commit"],
            "command": data["command"],
            "title": workload.title,
            "systems": systems,
            "targets": {m.key: list(m.target) for m in workload.metrics if m.target},
        }
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    data = asyncio.run(run_suite(args))
    data["elapsed_s"] = time.perf_counter() - started
    previous = args.out / "results" / "latest.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        kept = {k: v for k, v in old["workloads"].items() if k not in data["workloads"]}
        for entry in kept.values():
            entry.setdefault("command", old.get("command", "?"))
            entry.setdefault("measured_at", old["machine"].get("date", "?"))
            entry.setdefault("coda_commit", old["machine"].get("coda_commit", "?"))
        data["workloads"] = kept | data["workloads"]
        data["merged_from"] = old.get("command")
        data["machine_of_merged"] = old["machine"]
    json_path, md_path = report.write(args.out, data, WORKLOADS)
    print(
        f"wrote {json_path} and {md_path} in {data['elapsed_s']:.0f}s", file=sys.stderr
    )
    failed = [
        f"{name} {system}"
        for name, w in data["workloads"].items()
        for system, entry in w["systems"].items()
        if "error" in entry
    ]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
