"""The example's main job: process every bundled event through `coda run`.

    python -m examples.sentry_app.pipeline                   # the bundled events
    python -m examples.sentry_app.pipeline path/to/samples   # .json/.jsonl/dirs

Starts a real supervisor (`coda run examples.sentry_app.app`) with its worker
processes on the journal (unless one is already serving it), submits one
`process_event` run per event, waits for all of them with a progress bar, and
prints a summary. Run ids are derived from the events, so running the job again
finds the same runs instead of processing the events twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from coda.runtime.client import Client, default_socket_path
from examples.sentry_app import store
from examples.sentry_app.data import BUNDLED_DATA, load_events

console = Console(stderr=True, highlight=False)

DEFAULT_INPUTS = [BUNDLED_DATA / "python-sdk.jsonl", BUNDLED_DATA / "samples"]


def run_id_for(event: dict[str, Any], source: str, index: int) -> str:
    """A stable run id per event, so a second run of the job finds the first's."""
    digest = hashlib.sha256(orjson.dumps(event, option=orjson.OPT_SORT_KEYS))
    return f"evt-{digest.hexdigest()[:24]}"


async def _connect(journal: str, attempts: int = 100) -> Client:
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return await Client.connect(journal=journal, timeout=2.0)
        except Exception as exc:  # not up yet
            last = exc
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the supervisor did not come up: {last}")


async def process(
    inputs: list[Path], journal: str, store_path: str, project_id: int
) -> dict[str, Any]:
    events = [pair for path in inputs for pair in load_events(path)]
    client = await _connect(journal)
    started = time.perf_counter()
    before = await client.stats()
    try:
        submitted = await asyncio.gather(
            *(
                client.submit(
                    "process_event",
                    {
                        "project_id": project_id,
                        "event_data": event,
                        "store_path": store_path,
                        "default_platform": platform,
                    },
                    run_id=run_id_for(event, "", i),
                )
                for i, (event, platform) in enumerate(events)
            )
        )
        summaries = []
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task("processing events", total=len(submitted))
            for done in asyncio.as_completed([client.wait(r) for r in submitted]):
                summaries.append(await done)
                progress.advance(bar)
        after = await client.stats()
    finally:
        await client.close()
    elapsed = time.perf_counter() - started
    statuses = [s["status"] for s in summaries]
    groups = store.summary(store_path)
    return {
        "events": len(events),
        "runs_completed": statuses.count("completed"),
        "runs_failed": len(statuses) - statuses.count("completed"),
        "symbolicated": sum(
            1 for s in summaries if (s.get("result") or {}).get("symbolicated")
        ),
        "groups": groups.get("groups"),
        "stored_events": groups.get("events"),
        "tasks_executed": after["tasks_dispatched"] - before["tasks_dispatched"],
        "tasks_reused": after["tasks_reused"] - before["tasks_reused"],
        "elapsed_s": round(elapsed, 3),
        "failed_runs": [s["run_id"] for s in summaries if s["status"] != "completed"],
    }


def _supervisor_answers(journal: str) -> bool:
    """Whether a supervisor listens for this journal (a stale socket file does not)."""
    path = default_socket_path(journal)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _start_supervisor(journal: str, workers: int | None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "coda", "run", "examples.sentry_app.app"]
    command += ["--journal", journal]
    if workers:
        command += ["--workers", str(workers)]
    return subprocess.Popen(command, cwd=os.getcwd())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path, help="event files or dirs")
    parser.add_argument("--journal", default="coda.db")
    parser.add_argument("--store", default="sentry_store.db")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--project-id", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    inputs = args.inputs or DEFAULT_INPUTS
    store_path = str(Path(args.store).absolute())

    supervisor = None
    if not _supervisor_answers(args.journal):
        supervisor = _start_supervisor(args.journal, args.workers)
    try:
        summary = asyncio.run(
            process(inputs, args.journal, store_path, args.project_id)
        )
    finally:
        if supervisor is not None:
            supervisor.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                supervisor.wait(30)
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        table = Table("", "", title="event pipeline summary", show_header=False)
        for key, value in summary.items():
            if key != "failed_runs":
                table.add_row(key.replace("_", " "), str(value))
        Console().print(table)
        for run_id in summary["failed_runs"]:
            print(f"failed: {run_id} (see `coda history {run_id}`)")
        print(f"inspect any run with: coda history <run-id> --journal {args.journal}")
    return 0 if not summary["failed_runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
