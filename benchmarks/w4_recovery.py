"""W4: recovery of a journal of 1,000,000 finished events and 10,000 open runs.

The journal (built once and cached, see `journal_builder`) holds 166,667
finished one-task runs (1,000,002 events) and 10,000 runs whose task was
running when their supervisor died. From the moment `coda run` is started:

* `serving_s`: until its socket answers: the unfinished runs are folded, the
  interrupted tries recorded and the workers started;
* `running_s`: until every unfinished run's task has been sent to a worker
  again (the supervisor's `tasks_dispatched` reaches 10,000), the figure the
  target is about;
* `done_s`: until all 10,000 runs have completed;
* `peak_mb`: the supervisor's peak resident memory (VmHWM) by then.
"""

from __future__ import annotations

import asyncio
import time

from benchmarks import journal_builder
from benchmarks.harness import CodaServer, temp_dir
from benchmarks.workload import Metric, Metrics, Workload

FINISHED_EVENTS, UNFINISHED = 1_000_000, 10_000
QUICK_FINISHED_EVENTS, QUICK_UNFINISHED = 60_000, 1_000
POLL_S = 0.005
LIMIT_S = 300.0


async def measure(system: str, quick: bool) -> Metrics:
    finished, unfinished = (
        (QUICK_FINISHED_EVENTS, QUICK_UNFINISHED)
        if quick
        else (FINISHED_EVENTS, UNFINISHED)
    )
    source = await asyncio.to_thread(
        journal_builder.cached_journal, finished, unfinished
    )
    with temp_dir("w4") as tmp:
        journal = await asyncio.to_thread(journal_builder.fresh_copy, source, tmp)
        server = CodaServer(journal, start_timeout=LIMIT_S)
        await server.start()
        try:
            serving = server.ready_at - server.started_at
            client = await server.client()
            try:
                running = done = None
                deadline = time.monotonic() + LIMIT_S
                while done is None and time.monotonic() < deadline:
                    stats = await client.stats()
                    now = time.perf_counter() - server.started_at
                    if running is None and stats["tasks_dispatched"] >= unfinished:
                        running = now
                    if stats["completed"] >= unfinished:
                        done = now
                    await asyncio.sleep(POLL_S)
                if running is None or done is None:
                    raise RuntimeError(f"recovery did not finish in {LIMIT_S}s")
            finally:
                await client.close()
            memory = server.memory()
        finally:
            await server.stop()
    return {
        "running_s": running,
        "serving_s": serving,
        "done_s": done,
        "peak_mb": memory["hwm"],
        "count": unfinished,
    }


WORKLOAD = Workload(
    name="W4",
    title=(
        f"recovery: {FINISHED_EVENTS:,} events of finished runs + "
        f"{UNFINISHED:,} unfinished runs"
    ),
    metrics=(
        Metric("running_s", "s until all running", False, target=("<=", 3.0)),
        Metric("serving_s", "s until serving", False),
        Metric("done_s", "s until all completed", False),
        Metric("peak_mb", "supervisor peak MB", False),
    ),
    measure=measure,
    not_applicable={
        "dbos": "not measured: DBOS has recovery (pending workflows of the "
        "executor are resumed by DBOS.launch), but an equivalent system "
        "database (166,667 finished and 10,000 pending workflows) would take "
        "about 4 hours to build through DBOS at this machine's rate, and "
        "writing DBOS's tables directly would depend on its private schema; "
        "W5 times its recovery of one long workflow instead",
        "dbos-wal": "as for dbos (about 30 minutes to build with WAL)",
        "huey": "Huey keeps no history of finished tasks and has no recovery of "
        "interrupted ones: a task a worker was running when it died is lost "
        "unless it was enqueued again by hand",
    },
)
