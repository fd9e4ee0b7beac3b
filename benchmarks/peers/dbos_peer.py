"""DBOS Transact on its SQLite system database, driven like Coda.

    python -m benchmarks.peers.dbos_peer W1 --runs 300 [--wal]


DBOS runs workflows inside the application's own process: this process is
both the client and the executor. Its system database is a SQLite file in a
temporary directory (`system_database_url="sqlite:///..."`), with DBOS's
defaults: SQLite's rollback journal and `synchronous=FULL`. With `--wal` every
SQLite connection DBOS opens also gets `PRAGMA journal_mode=WAL` and
`PRAGMA synchronous=NORMAL`, through a SQLAlchemy "connect" listener on all
engines (DBOS has no option for SQLite pragmas; its own listener sets the
busy timeout and IMMEDIATE transactions, and is kept).

* W1: `pipeline` workflow of three `@DBOS.step`s (the same functions as
  Coda's), started with `DBOS.start_workflow` for every event at once.
* W2: a workflow of one no-op step, started at once for every run.
* W3: one such workflow at a time, start to result.
* W5: a workflow of `--tasks` no-op steps (100 at a time, as Coda's run; DBOS
  steps of one workflow run one after another) and then a gate step. A first
  process runs it until the gate step starts and dies (`os._exit`); a second
  process is started with the gate open and DBOS's start-up recovery resumes
  the workflow, re-executing the workflow function against the recorded step
  outputs. Timed from starting the second process to the workflow's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, percentile, python_env
from benchmarks.peers.common import emit, parse

LIMIT_S = 1800.0


def setup(db: Path, wal: bool) -> Any:
    import sqlalchemy as sa
    from dbos import DBOS, DBOSConfig
    from sqlalchemy import event

    if wal:

        @event.listens_for(sa.engine.Engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    config: DBOSConfig = {
        "name": "coda-bench",
        "system_database_url": f"sqlite:///{db}",
        "application_version": "coda-bench",
        "log_level": "WARNING",
    }
    DBOS(config=config)
    return DBOS


def define(DBOS: Any) -> dict[str, Any]:
    from benchmarks.apps import work

    @DBOS.step()
    def normalize_event(project_id: int, event_data: dict[str, Any]) -> Any:
        return work.normalize_step(project_id, event_data)

    @DBOS.step()
    def symbolicate_event(project_id: int, event_data: dict[str, Any]) -> Any:
        return work.symbolicate_step(project_id, event_data)

    @DBOS.step()
    def store_event(project_id: int, event_data: dict[str, Any], path: str) -> Any:
        return work.store_step(project_id, event_data, path)

    @DBOS.workflow()
    def pipeline(project_id: int, event_data: dict[str, Any], path: str) -> Any:
        event = normalize_event(project_id, event_data)
        event = symbolicate_event(project_id, event)
        return store_event(project_id, event, path)

    @DBOS.step()
    def noop() -> None:
        return None

    @DBOS.workflow()
    def one_task() -> None:
        return noop()

    @DBOS.step()
    def gate(path: str, reached: str, limit_s: float = 600.0) -> bool:
        Path(reached).touch()
        deadline = time.monotonic() + limit_s
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    @DBOS.workflow()
    def long_run(tasks: int, gate_path: str, reached: str) -> int:
        for _ in range(tasks):
            noop()
        gate(gate_path, reached)
        return tasks

    return locals()


def throughput(DBOS: Any, fns: dict[str, Any], workload: str, runs: int) -> None:
    from benchmarks.apps import work

    if workload == "W1":
        with tempfile.TemporaryDirectory(prefix="coda-bench-dbos-store-") as tmp:
            store = str(Path(tmp) / "store.db")
            events = [work.make_event(i) for i in range(runs)]
            started = time.perf_counter()
            handles = [
                DBOS.start_workflow(fns["pipeline"], 1, e, store) for e in events
            ]
            for handle in handles:
                handle.get_result()
            elapsed = time.perf_counter() - started
        emit(
            {
                "runs_per_s": runs / elapsed,
                "tasks_per_s": runs * 3 / elapsed,
                "seconds": elapsed,
            }
        )
    elif workload == "W2":
        started = time.perf_counter()
        handles = [DBOS.start_workflow(fns["one_task"]) for _ in range(runs)]
        for handle in handles:
            handle.get_result()
        elapsed = time.perf_counter() - started
        emit({"runs_per_s": runs / elapsed, "seconds": elapsed})
    elif workload == "W3":
        samples = []
        for i in range(20 + runs):
            started = time.perf_counter()
            DBOS.start_workflow(fns["one_task"]).get_result()
            if i >= 20:
                samples.append(time.perf_counter() - started)
        emit(
            {
                "p50_ms": percentile(samples, 50) * 1000,
                "p99_ms": percentile(samples, 99) * 1000,
                "mean_ms": sum(samples) / len(samples) * 1000,
            }
        )
    else:
        raise SystemExit(f"dbos has no workload {workload}")


def w5_phase(db: Path, wal: bool, phase: str, tasks: int, tmp: Path) -> None:
    DBOS = setup(db, wal)
    fns = define(DBOS)
    DBOS.launch()
    gate_path, reached = str(tmp / "gate"), str(tmp / "reached")
    if phase == "first":
        handle = DBOS.start_workflow(fns["long_run"], tasks, gate_path, reached)
        Path(tmp / "workflow_id").write_text(handle.get_workflow_id())
        deadline = time.monotonic() + LIMIT_S
        while not os.path.exists(reached) and time.monotonic() < deadline:
            time.sleep(0.01)
        sys.stdout.flush()
        os._exit(0 if os.path.exists(reached) else 1)  # die with the run open
    workflow_id = Path(tmp / "workflow_id").read_text()
    result = DBOS.retrieve_workflow(workflow_id).get_result()
    print(json.dumps({"done_at": time.time(), "result": result}), flush=True)
    os._exit(0)


def w5(wal: bool, tasks: int) -> None:
    with tempfile.TemporaryDirectory(prefix="coda-bench-dbos-w5-") as name:
        tmp = Path(name)
        db = tmp / "dbos.sqlite"
        command = [sys.executable, "-m", "benchmarks.peers.dbos_peer", "W5-phase"]
        command += ["--tasks", str(tasks), "--dir", str(tmp)] + (
            ["--wal"] if wal else []
        )
        subprocess.run(
            [*command, "--phase", "first"],
            cwd=REPO,
            env=python_env(),
            check=True,
            timeout=LIMIT_S,
            stdout=subprocess.DEVNULL,
        )
        (tmp / "gate").touch()
        started = time.time()
        out = subprocess.run(
            [*command, "--phase", "second"],
            cwd=REPO,
            env=python_env(),
            check=True,
            timeout=LIMIT_S,
            capture_output=True,
        ).stdout.decode()
        line = [x for x in out.splitlines() if x.startswith("{")][-1]
        done = json.loads(line)
        if done["result"] != tasks:
            raise SystemExit(f"the recovered workflow returned {done['result']}")
        resume_s = done["done_at"] - started
        assert db.exists()
    emit(
        {
            "resume_s": resume_s,
            "resume_tasks_per_s": tasks / resume_s,
        }
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "W5-phase":
        import argparse

        parser = argparse.ArgumentParser()
        parser.add_argument("workload")
        parser.add_argument("--tasks", type=int)
        parser.add_argument("--dir", type=Path)
        parser.add_argument("--phase")
        parser.add_argument("--wal", action="store_true")
        a = parser.parse_args()
        w5_phase(a.dir / "dbos.sqlite", a.wal, a.phase, a.tasks, a.dir)
        return
    args = parse()
    if args.workload == "W5":
        w5(args.wal, args.tasks)
        return
    with tempfile.TemporaryDirectory(prefix="coda-bench-dbos-") as tmp:
        DBOS = setup(Path(tmp) / "dbos.sqlite", args.wal)
        fns = define(DBOS)
        DBOS.launch()
        try:
            throughput(DBOS, fns, args.workload, args.runs)
        finally:
            DBOS.destroy()


if __name__ == "__main__":
    main()
