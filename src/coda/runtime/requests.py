"""What clients ask of the supervisor: submit a run, wait for it, cancel it,
reopen it.

A client is told of a submission only once the event saying so is durable
(the supervisor's write-ahead rule): a submission is acknowledged by
`settle_submission`, given whether it became durable, and one the journal
refused is forgotten, with everyone waiting for its run. A run id names one
run, so submitting an id again finds that run (and asking for it with another
workflow is an error); a submission of an id that is still being written is
waited for first, since its run is in memory before it is durable.

A new run's workflow code starts while its submission is being written (it
acts on nothing itself), and the submission lingers, up to
`Supervisor.LINGER`, for the code's first commands, so that both go out in
one commit.

Waiting for a run is answered when the run finishes or is parked, once that
is durable; a run finished lately is answered from its summary in memory
(`FinishedRuns`); any other run no longer live here was finished long ago (or
never existed), and the journal has its summary. A cancellation, or a reopening,
is acknowledged only when it changed something and that change is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import orjson

from coda import decide
from coda.definitions import Registry, WorkflowDef
from coda.errors import JournalError, RunIdConflict, RunNotFound
from coda.journal.base import Journal, RunSummary, summarize
from coda.runtime.runs import FinishedRuns, LiveRun, Record, Stats
from coda.state import RunStatus, fold

__all__ = ["Requests"]


class _Activate(Protocol):
    """`Activations.activate`: feed the run's instance what it has not seen."""

    def __call__(self, run: LiveRun, *, early: bool = ...) -> None: ...


def _same_workflow(run_id: str, existing: str, asked: str) -> None:
    """A run id names one run: asking for it with another workflow is an error."""
    if existing != asked:
        raise RunIdConflict(
            f"run id {run_id} is taken by a run of workflow {existing!r}, not "
            f"{asked!r}; choose another id"
        )


class Requests:
    """The supervisor's answers to clients.

    It shares the supervisor's runs, waiters and counters, records through
    the supervisor's `record` (one run's events, acted on once durable), and
    starts a new run's workflow code with `Activations.activate`.
    """

    def __init__(
        self,
        runs: dict[str, LiveRun],
        waiters: dict[str, list[asyncio.Future[RunSummary]]],
        finished: FinishedRuns,
        stats: Stats,
        *,
        journal: Journal,
        registry: Registry,
        clock: Callable[[], float],
        record: Record,
        activate: _Activate,
    ) -> None:
        self.runs = runs
        self._waiters = waiters
        self.finished = finished
        self.stats = stats
        self.journal = journal
        self.registry = registry
        self.clock = clock
        self._record = record
        self._activate = activate
        self._submitting: dict[str, asyncio.Future[Any]] = {}
        # The last append the journal refused, for those who ask why (set by
        # the supervisor).
        self.journal_error: JournalError | None = None

    async def submit(
        self, workflow: str, args: dict[str, Any], run_id: str, *, fresh: bool = False
    ) -> tuple[str, bool]:
        """Start a run, or find the run with this id; (run id, created).

        `fresh` says the id was just made up (a random uuid), so the journal
        cannot know it and is not asked.
        """
        definition = self.registry.workflow(workflow)
        while True:
            # A submission of this id still being written comes first: its run
            # is in `self.runs` before it is durable, and answering a duplicate
            # from there would acknowledge what a crash can still lose.
            pending = self._submitting.get(run_id)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            if run_id in self.runs:
                _same_workflow(run_id, self.runs[run_id].state.workflow, workflow)
                return run_id, False
            break
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submitting[run_id] = done
        try:
            known = None if fresh else await self.journal.run(run_id)
            if known is not None:
                _same_workflow(run_id, known.workflow, workflow)
                return run_id, False
            self.settle_submission(
                run_id, await self._new_run(definition, args, run_id)
            )
            return run_id, True
        finally:
            del self._submitting[run_id]
            done.set_result(None)

    def submit_fresh(
        self, workflow: str, args: dict[str, Any], run_id: str
    ) -> asyncio.Future[bool]:
        """`submit` of an id made up just now, which no run can have: no waiting.

        The future says whether the submission is durable; pass that to
        `settle_submission` before telling anyone.
        """
        definition = self.registry.workflow(workflow)
        durable = self._new_run(definition, args, run_id)
        self._submitting[run_id] = durable
        durable.add_done_callback(lambda _: self._submitting.pop(run_id, None))
        return durable

    def _new_run(
        self, definition: WorkflowDef[..., Any], args: dict[str, Any], run_id: str
    ) -> asyncio.Future[bool]:
        state, events = decide.new_run(
            run_id, definition.name, args, definition.policy, self.clock()
        )
        run = LiveRun(state, [])
        self.runs[run_id] = run
        # The workflow code may start while the submission is being written:
        # it acts on nothing itself, and whatever it asks for is appended after
        # the submission and acted on after that is durable. Its first
        # commands usually come back before the submission has been written,
        # so the submission lingers to share their commit.
        durable = self._record(run, events, linger=True)
        self._activate(run, early=True)
        return durable

    def settle_submission(self, run_id: str, durable: bool) -> None:
        """Count a durable submission; forget and refuse one that is not."""
        if not durable:
            self.forget_unrecorded(run_id)
            why = f" ({self.journal_error})" if self.journal_error else ""
            raise JournalError(
                f"run {run_id} could not be recorded, so it was not submitted; "
                f"submit it again{why}"
            )
        self.stats.submitted += 1

    def forget_unrecorded(self, run_id: str) -> None:
        """Drop a run whose submission never became durable, and its waiters.

        Someone may have asked to wait for it while it was being written; the
        run does not exist, and they hear so rather than waiting for ever.
        """
        self.runs.pop(run_id, None)
        for waiter in self._waiters.pop(run_id, ()):
            if not waiter.done():
                waiter.set_exception(
                    RunNotFound(
                        f"run {run_id} does not exist: its submission could not "
                        "be recorded"
                    )
                )

    def waiter(self, run_id: str) -> asyncio.Future[RunSummary] | None:
        """A future of the run's summary once it is finished or parked.

        None when the run is neither live here nor finished lately (finished
        long ago, or unknown): the journal has its summary.
        """
        run = self.runs.get(run_id)
        waiter: asyncio.Future[RunSummary] = asyncio.get_running_loop().create_future()
        if run is None:
            kept = self.finished.get(run_id)
            if kept is None:
                return None
            waiter.set_result(kept)
        elif run.state.status is RunStatus.PARKED and run.settled:
            waiter.set_result(summarize(run.state))
        else:
            self._waiters.setdefault(run_id, []).append(waiter)
        return waiter

    async def wait(self, run_id: str) -> RunSummary | None:
        """Wait until the run is finished or parked; its summary then.

        None when the run is not live here (finished long ago, or unknown):
        the journal has its summary. A result that came from a worker as a raw
        value (`waiter` passes it on as it is) is decoded here.
        """
        waiter = self.waiter(run_id)
        if waiter is None:
            return None
        summary = await waiter
        result = summary.result
        if type(result) is orjson.Fragment:
            summary = attrs.evolve(summary, result=orjson.loads(orjson.dumps(result)))
        return summary

    async def cancel(self, run_id: str, reason: str) -> bool:
        run = self.runs.get(run_id)
        if run is None:
            return False
        # Nothing to record (its end is decided already, durable or not): the
        # cancellation changed nothing, and must not be acknowledged as done.
        events = decide.cancel(run.state, reason, self.clock())
        return bool(events) and await self._record(run, events)

    async def reopen(self, run_id: str, reason: str) -> bool:
        """Retry a failed or cancelled run, or resume a parked one."""
        while (pending := self._submitting.get(run_id)) is not None:
            await asyncio.shield(pending)  # another retry of it is being read
        run = self.runs.get(run_id)
        if run is not None:
            events = decide.resume(run.state, reason, self.clock())
            return bool(events) and await self._record(run, events)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submitting[run_id] = done
        try:
            history = await self.journal.history(run_id)
            state = fold(history)
            if state is None:
                return False
            events = decide.retry_run(state, reason, self.clock())
            if not events:
                return False
            run = LiveRun(state, history, durable=len(history))
            self.runs[run_id] = run
            self.finished.drop(run_id)
            recorded = self._record(run, events)
        finally:
            del self._submitting[run_id]
            done.set_result(None)
        return await recorded
