"""The narrow interface every journal backend implements.

The supervisor, the in-process driver and the CLI talk to the journal only
through `Journal`. SQLite is the embedded default (`coda.journal.sqlite`); a
PostgreSQL backend for several supervisors is another implementation of the
same methods, not a change to their callers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from coda.journal.events import ErrorInfo, Event

if TYPE_CHECKING:
    from coda.state import RunState

__all__ = ["Journal", "RunSummary", "summarize"]


@attrs.frozen
class RunSummary:
    """One row of the `runs` projection: what `coda ls` shows."""

    run_id: str
    workflow: str
    status: str
    attempt: int
    submitted_at: float
    updated_at: float
    events: int
    result: Any = None
    error: ErrorInfo | None = None


class _LeftOut:
    def __repr__(self) -> str:
        return "RESULT_LEFT_OUT"


RESULT_LEFT_OUT: Any = _LeftOut()
"""A summary's result when it was over the `result_limit` it was read with."""


def summarize(state: RunState) -> RunSummary:
    """The `runs` row that a run's state amounts to."""
    return RunSummary(
        run_id=state.run_id,
        workflow=state.workflow,
        status=state.status.value,
        attempt=state.attempt,
        submitted_at=state.submitted_at,
        updated_at=state.updated_at,
        events=state.next_seq,
        result=state.result,
        error=state.error,
    )


class Journal(Protocol):
    async def append(self, events: Sequence[Event]) -> None:
        """Append events durably; return once they are committed.

        Calls that arrive while a transaction is being written are committed
        together in the next one (group commit). Either all of a call's events
        are committed or none are.
        """

    async def history(self, run_id: str) -> list[Event]:
        """Every event of one run, in order; [] for a run the journal never saw."""

    async def resolve(self, run_id_or_prefix: str) -> str:
        """The full run id for an id or a unique prefix; `RunNotFound` otherwise."""

    async def run(
        self, run_id: str, *, result_limit: int | None = None
    ) -> RunSummary | None:
        """The run's row; None for a run the journal never saw.

        With `result_limit`, a result of more characters than that is not
        read: the summary's result is `RESULT_LEFT_OUT` instead.
        """

    async def runs(
        self,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        result_limit: int | None = None,
    ) -> list[RunSummary]:
        """Runs from the projection, most recently submitted first.

        `result_limit` as for `run`.
        """

    async def unfinished(self) -> dict[str, list[Event]]:
        """The histories of every run that is not finished, for start-up."""

    async def cached_result(self, run_id: str, cache_key: list[Any]) -> Any:
        """The result cached under `cache_key` in the run; `KeyError` if none."""

    async def integrity_problems(self) -> list[str]:
        """What is wrong with the stored journal itself; changes nothing."""

    async def close(self) -> None: ...
