"""Replaying a recorded run in a unit test, with no supervisor and no I/O.

    from coda.replay import load_history, replay

    def test_run_from_production_still_replays():
        history = load_history("tests/data/run-3f2a.jsonl")  # `coda history --json`
        outcome = replay(process_event, history)
        assert outcome.error.type == "KeyError"

`replay` re-executes the current workflow code against the history: every
task result, side effect and cached reuse comes from the history, nothing runs
for real. It returns what the code did (the result it returned or the error it
raised at the end of the run's last attempt, beside what was recorded), or
raises `NondeterminismError` naming the first step where the code no longer
does what was recorded. A fix that makes the code fail differently, or return
something else, shows in `error` or `result`; the recorded ones stay in
`recorded_error` and `recorded_result`.
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
from coda.replay.engine import Command, CompleteRun, FailAttempt, WorkflowInstance
from coda.state import RunStatus, fold

__all__ = ["ReplayOutcome", "load_history", "replay"]


@attrs.frozen
class ReplayOutcome:
    """What a replay reproduced.

    `status` is the run's status at the end of the history. `result` and
    `error` are what the code returned or raised now, at the end of the last
    attempt the history records an ending of (for a run that ended otherwise,
    cancelled or parked, say, or not yet: what was recorded);
    `recorded_result` and `recorded_error` what the history says. `commands`
    is what the code would do next if the history is unfinished (empty for a
    finished run).
    """

    run_id: str
    status: str
    result: Any
    error: ErrorInfo | None
    commands: list[Command]
    recorded_result: Any = None
    recorded_error: ErrorInfo | None = None

    @property
    def reproduced(self) -> bool:
        """Whether the code ended as recorded: the same result, or an error of
        the same type (messages may differ from run to run)."""
        if self.recorded_error is None or self.error is None:
            return self.error is self.recorded_error and (
                self.result == self.recorded_result
            )
        return self.error.type == self.recorded_error.type


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
    instance, commands = WorkflowInstance.from_history(workflow, history)
    recorded = state.error if state.status is not RunStatus.COMPLETED else None
    result, error = state.result, recorded
    # The code's own ending of the attempt whose ending the run's outcome
    # is (completed, or failed for good); the engine has checked that it
    # completed or failed as recorded.
    made = instance.endings_made.get(state.attempt)
    if state.status is RunStatus.COMPLETED and isinstance(made, CompleteRun):
        result = made.result
    elif state.status is RunStatus.FAILED and isinstance(made, FailAttempt):
        error = made.error
    return ReplayOutcome(
        run_id=state.run_id,
        status=state.status.value,
        result=result,
        error=error,
        commands=commands,
        recorded_result=state.result,
        recorded_error=recorded,
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
