"""An in-memory journal: the `Journal` interface with no file, for fast tests.

It keeps the same promises as the SQLite journal that matter to callers (an
append is all or nothing; positions are unique; histories come back in order)
and none of the durability.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coda.errors import JournalError, RunNotFound
from coda.journal.base import RunSummary, summarize
from coda.journal.events import Event
from coda.state import RunState, apply, cache_token

__all__ = ["MemoryJournal"]


class MemoryJournal:
    def __init__(self) -> None:
        self.events: dict[str, list[Event]] = {}
        self._states: dict[str, RunState] = {}
        self.appends = 0

    async def append(self, events: Sequence[Event]) -> None:
        staged: dict[str, list[Event]] = {}
        for event in events:
            known = len(self.events.get(event.run_id, ())) + len(
                staged.get(event.run_id, ())
            )
            if event.seq != known:
                raise JournalError(
                    f"run {event.run_id}: event #{event.seq} does not follow "
                    f"#{known - 1}"
                )
            staged.setdefault(event.run_id, []).append(event)
        for run_id, new in staged.items():
            self.events.setdefault(run_id, []).extend(new)
            state = self._states.get(run_id)
            for event in new:
                state = apply(state, event)
            assert state is not None
            self._states[run_id] = state
        self.appends += 1

    async def history(self, run_id: str) -> list[Event]:
        return list(self.events.get(run_id, ()))

    async def resolve(self, run_id_or_prefix: str) -> str:
        if run_id_or_prefix in self.events:
            return run_id_or_prefix
        found = [r for r in self.events if r.startswith(run_id_or_prefix)]
        if len(found) != 1:
            raise RunNotFound(
                f"{len(found)} runs match {run_id_or_prefix!r}; give more of the id"
            )
        return found[0]

    async def run(
        self, run_id: str, *, result_limit: int | None = None
    ) -> RunSummary | None:
        # In memory already: every result is read whole.
        state = self._states.get(run_id)
        return None if state is None else summarize(state)

    async def runs(
        self,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        result_limit: int | None = None,
    ) -> list[RunSummary]:
        states = sorted(self._states.values(), key=lambda s: -s.submitted_at)
        return [
            summarize(s)
            for s in states
            if (status is None or s.status.value == status)
            and (workflow is None or s.workflow == workflow)
        ][:limit]

    async def unfinished(self) -> dict[str, list[Event]]:
        return {
            run_id: list(self.events[run_id])
            for run_id, state in self._states.items()
            if not state.status.finished
        }

    async def cached_result(self, run_id: str, cache_key: list[Any]) -> Any:
        return self._states[run_id].cache[cache_token(cache_key)][0]

    async def integrity_problems(self) -> list[str]:
        # Appends are checked as they come (positions and the fold), so the
        # memory journal cannot hold a damaged history.
        return []

    async def close(self) -> None:
        pass
