"""W5: replay of a long history (10,000 tasks in one run) by a worker.

A `long_run` of 10,000 no-op tasks (100 at a time, then a gate task that waits
for a file) runs through `coda run` until its gate task is running; the
supervisor is then stopped (SIGTERM), which leaves the run unfinished with a
history of about 30,000 events. Two figures:

* `replay_events_per_s`, the target's figure: the worker's own code path for
  an activation with the full history (what a worker does after the run's
  previous host died, or after a restart): the history goes through the wire
  form (`codec.encode_dict`, one orjson frame), is decoded event by event
  (`codec.decode_dict`) and fed to a fresh `WorkflowInstance`, timed from the
  frame's bytes to the commands. In this process, median of 3 replays.
* `resume_s` and `resume_events_per_s`: end to end, through the real processes:
  the gate file is created and `coda run` started again; from its start until
  the run's result is known: recovery folds the history, a worker is sent it
  whole and replays it, the gate task runs again, the run completes.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import orjson

from benchmarks import peers
from benchmarks.apps import coda_app
from benchmarks.harness import CodaServer, temp_dir
from benchmarks.workload import Metric, Metrics, Workload
from coda.journal import codec
from coda.journal.events import Event
from coda.journal.sqlite import read_history_sync
from coda.replay.engine import WorkflowInstance

TASKS, QUICK_TASKS = 10_000, 1_000
WIDTH = 100
LIMIT_S = 600.0


def replay_once(run_id: str, args: dict[str, object], frame: bytes) -> float:
    """Seconds for a worker's full-history activation of `frame`."""
    started = time.perf_counter()
    message = orjson.loads(frame)
    events = [codec.decode_dict(e) for e in message["events"]]
    instance = WorkflowInstance(coda_app.long_run, run_id, args)
    commands = instance.activate(events)
    elapsed = time.perf_counter() - started
    if commands or instance.finished:
        raise RuntimeError(f"replay made new commands {commands[:3]}: it diverged")
    return elapsed


def activation_frame(run_id: str, history: list[Event]) -> bytes:
    return orjson.dumps(
        {
            "op": "activate",
            "run": run_id,
            "workflow": coda_app.long_run.name,
            "args": {},
            "full": True,
            "events": [codec.encode_dict(e) for e in history],
        }
    )


async def measure(system: str, quick: bool) -> Metrics:
    tasks = QUICK_TASKS if quick else TASKS
    if system != "coda":
        return await peers.run(system, "W5", quick=quick, tasks=tasks)
    with temp_dir("w5") as tmp:
        journal, gate = tmp / "coda.db", tmp / "gate"
        args = {"tasks": tasks, "width": WIDTH, "gate_path": str(gate)}
        async with CodaServer(journal, start_timeout=LIMIT_S) as server:
            client = await server.client()
            try:
                run_id = await client.submit("long_run", args)
                deadline = time.monotonic() + LIMIT_S
                while (await client.stats())["tasks_dispatched"] < tasks + 1:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{tasks} tasks did not run in {LIMIT_S}s")
                    await asyncio.sleep(0.05)
            finally:
                await client.close()
        history = read_history_sync(journal, run_id)

        frame = activation_frame(run_id, history)
        replays = [replay_once(run_id, args, frame) for _ in range(3)]
        replay_s = statistics.median(replays)

        gate.touch()
        server = CodaServer(journal, start_timeout=LIMIT_S)
        await server.start()
        try:
            client = await server.client()
            try:
                await client.result(run_id, timeout=LIMIT_S)
                resume_s = time.perf_counter() - server.started_at
            finally:
                await client.close()
        finally:
            await server.stop()
    return {
        "replay_events_per_s": len(history) / replay_s,
        "replay_s": replay_s,
        "resume_s": resume_s,
        "resume_events_per_s": len(history) / resume_s,
        "resume_tasks_per_s": tasks / resume_s,
        "events": len(history),
        "count": tasks,
    }


WORKLOAD = Workload(
    name="W5",
    title=f"replay of one run of {TASKS:,} tasks by a worker that lost it",
    metrics=(
        Metric("replay_events_per_s", "replay events/s", target=(">=", 100_000)),
        Metric("replay_s", "replay s", False),
        Metric("resume_s", "restart to result s", False),
        Metric("resume_events_per_s", "restart to result events/s", ratio=False),
        Metric("resume_tasks_per_s", "restart to result, tasks/s"),
        Metric("events", "events in the history", ratio=False),
    ),
    measure=measure,
    not_applicable={
        "huey": "Huey has no workflow history to replay: a pipeline's later "
        "tasks are enqueued by the earlier ones, and nothing is re-executed "
        "against recorded results",
    },
)
