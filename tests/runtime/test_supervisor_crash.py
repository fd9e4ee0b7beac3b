"""The supervisor killed with SIGKILL in the middle of workflows, then restarted."""

from __future__ import annotations

import collections
from typing import Any

from coda.journal.events import RunCompleted, TaskCompleted, TaskScheduled

from .support import CodaProcess, wait_for

RUNS = 20
STEPS = 4


def side_effects(path: Any) -> collections.Counter[tuple[str, int]]:
    """How many tries of each (run tag, step) got as far as their side effect."""
    counts: collections.Counter[tuple[str, int]] = collections.Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            tag, index = line.split()
            counts[(tag, int(index))] += 1
    return counts


def completed_steps(coda: CodaProcess, run_ids: list[str]) -> set[tuple[str, int]]:
    """(run id, step index) of every task completion in the journal."""
    done = set()
    for run_id in run_ids:
        scheduled: dict[tuple[int, int], int] = {}
        for event in coda.history(run_id):
            if isinstance(event, TaskScheduled):
                scheduled[(event.attempt, event.step)] = event.args["index"]
            elif isinstance(event, TaskCompleted):
                done.add((run_id, scheduled[(event.attempt, event.step)]))
    return done


def test_runs_survive_a_supervisor_sigkill(coda: CodaProcess) -> None:
    side = coda.workdir / "side-effects"
    run_ids = [f"chain-{n:02d}" for n in range(RUNS)]
    with coda.client() as client:
        for run_id in run_ids:
            args = {"side_file": str(side), "tag": run_id, "steps": STEPS}
            client.submit("chain", {**args, "delay": 0.1}, run_id=run_id)

    # Kill it once a good part of the work is done, and not all of it.
    wait_for(
        lambda: sum(side_effects(side).values()) >= RUNS * STEPS // 3,
        20,
        "a third of the steps",
    )
    workers = coda.worker_pids()
    coda.kill()
    assert len(workers) == 2
    # Their socket closed: the workers leave on their own, tasks and all.
    coda.workers_gone(timeout=5)

    before = completed_steps(coda, run_ids)
    effects_before = side_effects(side)
    finished_before = {r.run_id for r in coda.runs() if r.status == "completed"}
    assert before, "the kill came before any task completed"
    assert len(before) < RUNS * STEPS, "the kill came after every task completed"
    assert len(finished_before) < RUNS
    # Nothing is journaled as done that did not happen.
    assert all(effects_before[step] >= 1 for step in before)

    coda.start()
    with coda.client() as client:
        results = {r: client.result(r, timeout=30) for r in run_ids}

    expected = [i * i for i in range(STEPS)]
    assert results == {r: {"tag": r, "results": expected} for r in run_ids}
    summaries = {r.run_id: r for r in coda.runs()}
    assert {r: summaries[r].status for r in run_ids} == dict.fromkeys(
        run_ids, "completed"
    )
    for run_id in run_ids:
        history = coda.history(run_id)
        assert sum(isinstance(e, RunCompleted) for e in history) == 1
        assert [e.seq for e in history] == list(range(len(history)))

    # At least once: every step ran. Exactly once for every step whose
    # completion was durable before the kill: it never ran again.
    effects = side_effects(side)
    assert set(effects) == {(r, i) for r in run_ids for i in range(STEPS)}
    assert {step: effects[step] for step in before} == dict.fromkeys(before, 1)
    repeated = {step for step, count in effects.items() if count > 1}
    assert not repeated & before
