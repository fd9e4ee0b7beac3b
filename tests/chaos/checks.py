"""What a chaos run must have left behind, checked against the journal.

Inputs: the final journal (read-only), the side-effect file every task
execution appended one line to before doing anything else (`chaos_app`), the
crash-free reference outcomes, and what the client was acknowledged.

For every task step, identified by (run, attempt, label), the history gives

    S  tries started (`TaskStarted`),
    C  1 if a `TaskCompleted` is recorded,
    F  failures the task raised itself (deliberate ones: `ConnectionError`,
       `ValueError`),
    L  failures that were crashes: `WorkerLost`, `Interrupted` (the supervisor
       stopped or died), `TaskTimeout`,
    D  1 if a try is still open at the end (a run cancelled while it ran),

and the side-effect file gives E, the executions of the step. Then:

1. E <= S. An execution needs a try whose start is durable: tries are sent
   to workers only after their `TaskStarted` is committed (write-ahead).
2. E >= C + F. Each recorded outcome came from an execution, which wrote its
   line first.
3. E - C - F <= L + D. The executions beyond those whose outcome was recorded
   are tries lost to a crash (the worker died, the supervisor died or
   stopped, a timeout killed the worker), or still open in a cancelled run.
   This is "a task runs more than once only when its worker or the supervisor
   died before its completion was durable", counted try by try.
4. For a completed step, every execution began before its `TaskCompleted`
   was recorded (the event's time is taken before it is committed, so this
   is stricter than "before it was durable"). No try of a step starts once
   its completion is known; a try that was already running when another try
   completed would be a lost one, killed with its worker.
5. No `TaskStarted` follows a `TaskCompleted` of the same step (the fold
   refuses it too, so `coda doctor` would also say so).

Per run: it is finished; its status and result (or error type) equal the
reference's, except that a run we asked to cancel may end cancelled; a run
whose cancellation was acknowledged as done is cancelled. Every acknowledged
submission is in the journal. `coda doctor` reports nothing.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coda.journal.events import (
    TaskCompleted,
    TaskFailed,
    TaskReused,
    TaskScheduled,
    TaskStarted,
)
from coda.journal.sqlite import read_history_sync, read_runs_sync
from tests.chaos.reference import Outcome
from tests.chaos.workload import Submission

CRASHES = (
    "coda.errors.WorkerLost",
    "coda.errors.Interrupted",
    "coda.errors.TaskTimeout",
)
FINISHED = ("completed", "failed", "cancelled")


@dataclass
class Step:
    started: int = 0
    completed: int = 0
    completed_at: float | None = None
    own_failures: int = 0
    crash_failures: int = 0
    reused: bool = False
    starts: list[float] = field(default_factory=list)  # executions' start times


@dataclass
class Figures:
    runs: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    steps_reused: int = 0
    executions: int = 0
    tries_started: int = 0
    crash_failures: int = 0
    reexecutions_after_crash: int = 0  # E - C - F summed: all explained by L + D
    executions_unexplained: int = 0  # must be 0
    executions_after_completion: int = 0  # must be 0
    results_wrong: int = 0  # must be 0
    runs_unfinished: int = 0  # must be 0
    acked_lost: int = 0  # must be 0
    doctor_problems: int = 0  # must be 0


def read_side_file(path: Path) -> dict[tuple[str, int, str], list[float]]:
    """Executions by (run, attempt, label): their start times, in seconds."""
    starts: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    if not path.exists():
        return starts
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) != 6:
            raise AssertionError(f"{path}:{number}: torn side-effect line {line!r}")
        run, attempt, label, start_ns = parts[0], int(parts[1]), parts[2], parts[3]
        starts[(run, attempt, label)].append(int(start_ns) / 1e9)
    return starts


def steps_of(history: list[Any]) -> tuple[dict[tuple[int, str], Step], list[str]]:
    """Each task step of one run's history, by (attempt, label)."""
    steps: dict[tuple[int, str], Step] = {}
    labels: dict[tuple[int, int], str] = {}
    problems = []
    for event in history:
        if isinstance(event, TaskScheduled):
            label = str(event.args["label"])
            labels[(event.attempt, event.step)] = label
            steps[(event.attempt, label)] = Step()
        elif isinstance(event, TaskReused):
            # The chaos app's cache keys are [label].
            label = str(event.cache_key[0])
            labels[(event.attempt, event.step)] = label
            steps[(event.attempt, label)] = Step(reused=True)
        elif isinstance(event, (TaskStarted, TaskCompleted, TaskFailed)):
            label = labels[(event.attempt, event.step)]
            step = steps[(event.attempt, label)]
            if isinstance(event, TaskStarted):
                if step.completed:
                    problems.append(
                        f"event #{event.seq}: try {event.try_number} of step "
                        f"{label} (attempt {event.attempt}) started after the step "
                        "had completed"
                    )
                step.started += 1
            elif isinstance(event, TaskCompleted):
                step.completed += 1
                step.completed_at = event.at
            elif event.try_number > 0:
                if event.error.is_a(CRASHES):
                    step.crash_failures += 1
                else:
                    step.own_failures += 1
    return steps, problems


def check_steps(
    run_id: str,
    steps: dict[tuple[int, str], Step],
    executions: dict[tuple[str, int, str], list[float]],
    figures: Figures,
) -> list[str]:
    problems = []
    for (run, attempt, label), starts in executions.items():
        if run == run_id and (attempt, label) not in steps:
            problems.append(
                f"run {run_id}: step {label} of attempt {attempt} ran {len(starts)} "
                "times but the journal never scheduled it"
            )
    for (attempt, label), step in sorted(steps.items()):
        starts = executions.get((run_id, attempt, label), [])
        where = f"run {run_id}, attempt {attempt}, step {label}"
        e, s = len(starts), step.started
        c, f, lost = step.completed, step.own_failures, step.crash_failures
        open_tries = s - c - f - lost
        figures.steps += 1
        figures.steps_reused += step.reused
        figures.executions += e
        figures.tries_started += s
        figures.crash_failures += lost
        if e > s:
            figures.executions_unexplained += e - s
            problems.append(
                f"{where}: {e} executions but only {s} tries started in the journal: "
                "a try ran before its start was durable"
            )
        if e < c + f:
            problems.append(
                f"{where}: {c + f} outcomes recorded but only {e} executions ran"
            )
        extra = e - c - f
        if extra > 0:
            figures.reexecutions_after_crash += min(extra, lost + open_tries)
        if extra > lost + open_tries:
            figures.executions_unexplained += extra - lost - open_tries
            problems.append(
                f"{where}: ran {e} times; the history explains {c + f} by their "
                f"outcomes and at most {lost + open_tries} by crashes (tries lost "
                f"or still open): {extra - lost - open_tries} executions are "
                "unexplained"
            )
        if step.completed_at is not None:
            late = [t for t in starts if t >= step.completed_at]
            if late:
                figures.executions_after_completion += len(late)
                problems.append(
                    f"{where}: {len(late)} executions began after its completion "
                    f"was recorded (at {step.completed_at:.6f}; began at "
                    f"{', '.join(f'{t:.6f}' for t in late)})"
                )
    return problems


def check_journal(
    journal: Path,
    side: Path,
    workload: list[Submission],
    reference: dict[str, Outcome],
    acked: set[str],
    cancel_sent: set[str],
    cancel_changed: set[str],
) -> tuple[list[str], Figures]:
    figures = Figures()
    problems: list[str] = []
    summaries = {s.run_id: s for s in read_runs_sync(journal, limit=10**6)}
    executions = read_side_file(side)
    statuses: dict[str, int] = defaultdict(int)

    lost = sorted(acked - set(summaries))
    figures.acked_lost = len(lost)
    if lost:
        problems.append(f"acknowledged submissions missing: {', '.join(lost[:10])}")

    for sub in workload:
        run_id = sub.run_id
        summary = summaries.get(run_id)
        if summary is None:
            figures.runs_unfinished += 1
            problems.append(f"run {run_id} is not in the journal")
            continue
        figures.runs += 1
        statuses[summary.status] += 1
        if summary.status not in FINISHED:
            figures.runs_unfinished += 1
            problems.append(f"run {run_id} did not finish: it is {summary.status}")
            continue
        if summary.status == "completed":
            outcome: Outcome = ("completed", summary.result)
        elif summary.status == "failed":
            outcome = ("failed", summary.error.type if summary.error else None)
        else:
            outcome = ("cancelled", None)
        expected = reference[run_id]
        if outcome[0] == "cancelled":
            if run_id not in cancel_sent:
                figures.results_wrong += 1
                problems.append(f"run {run_id} is cancelled, yet nobody cancelled it")
        elif run_id in cancel_changed:
            figures.results_wrong += 1
            problems.append(
                f"run {run_id}: its cancellation was acknowledged as done, yet it "
                f"ended {outcome[0]}"
            )
        elif outcome != expected:
            figures.results_wrong += 1
            problems.append(
                f"run {run_id} ended {outcome!r}; the crash-free run gives {expected!r}"
            )

        history = read_history_sync(journal, run_id)
        steps, order_problems = steps_of(history)
        problems += [f"run {run_id}: {p}" for p in order_problems]
        problems += check_steps(run_id, steps, executions, figures)

    figures.statuses = dict(statuses)
    doctor = subprocess.run(
        [sys.executable, "-m", "coda", "doctor", str(journal)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if doctor.returncode != 0:
        figures.doctor_problems = max(1, doctor.stdout.count("\n"))
        problems.append(
            f"coda doctor exited {doctor.returncode}:\n{doctor.stdout}{doctor.stderr}"
        )
    return problems, figures
