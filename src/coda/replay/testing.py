"""Replaying a recorded run in a unit test, with no supervisor and no I/O.

    from coda.replay import load_history, replay

    def test_run_from_production_still_replays():
        history = load_history("tests/data/run-3f2a.jsonl")  # `coda history --json`
        outcome = replay(process_event, history)
        assert outcome.error.type == "KeyError"

`replay` re-executes the current workflow code against the history: every
task result, side effect and cached reuse comes from the history, nothing runs
for real. It returns what the code reproduced, or raises `NondeterminismError`
naming the first step where the code no longer does what was recorded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from coda.definitions import WorkflowDef
from coda.errors import CodaError
from coda.journal import codec
from coda.journal.events import ErrorInfo, Event
from coda.replay.engine import Command, WorkflowInstance
from coda.state import RunStatus, fold

__all__ = ["ReplayOutcome", "load_history", "replay"]


@attrs.frozen
class ReplayOutcome:
    """What a replay reproduced.

    `status` is the run's status at the end of the history; `result` or
    `error` its outcome; `commands` what the code would do next if the history
    is unfinished (empty for a finished run).
    """

    run_id: str
    status: str
    result: Any
    error: ErrorInfo | None
    commands: list[Command]


def replay(workflow: WorkflowDef[..., Any], history: Sequence[Event]) -> ReplayOutcome:
    """Replay `history` against `workflow`'s current code."""
    state = fold(history)
    if state is None:
        raise CodaError("an empty history cannot be replayed")
    if state.workflow != workflow.name:
        raise CodaError(
            f"run {state.run_id} is of workflow {state.workflow!r}, "
            f"not {workflow.name!r}"
        )
    _, commands = WorkflowInstance.from_history(workflow, history)
    error = state.error if state.status is not RunStatus.COMPLETED else None
    return ReplayOutcome(
        run_id=state.run_id,
        status=state.status.value,
        result=state.result,
        error=error,
        commands=commands,
    )


def load_history(
    source: str | os.PathLike[str], run_id: str | None = None
) -> list[Event]:
    """A run's history from `coda history --json` output or from a journal file.

    A journal file needs `run_id` (or a unique prefix of it); a JSON-lines file
    holds one run's events, one per line.
    """
    path = Path(source)
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"SQLite format 3"):
        if run_id is None:
            raise CodaError(f"{path} is a journal: say which run to load (run_id=...)")
        from coda.journal.sqlite import read_history_sync

        return read_history_sync(path, run_id)
    events = [
        codec.decode(line) for line in path.read_bytes().splitlines() if line.strip()
    ]
    if run_id is not None:
        events = [e for e in events if e.run_id.startswith(run_id)]
    return events
