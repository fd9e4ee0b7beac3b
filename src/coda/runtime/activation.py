"""Workflow activations: feeding each run's instance on the worker hosting it.

Workflow instances are hosted by workers. A run sticks to the worker that
hosts it, which is fed only the run's new outcomes (`runs.feeds`); when that
worker dies, another is sent the whole history and replays it. What is fed is
durable, with one exception: a new run's code may start on its submission
while that is being written, since it acts on nothing itself.

At most one activation per run is in flight, so an instance never sees
events out of order, and each carries a number that the host's answer
repeats: an answer to an earlier one (sent before the run was reread, say)
is stale and dropped. The numbers are the supervisor's, not the run's: a run
cancelled and retried, or submitted again after its submission failed, is a
new `LiveRun`, and its activations must not share numbers with answers still
coming for the one before. An answer is the instance's commands, which are
decided on and recorded; a request to be sent the whole history again (the
host lost the instance); or the news that the code no longer replays its own
history, which parks the run until fixed code is deployed.

Workflow code runs on its host's event loop. Code that blocks it (a
`time.sleep`, blocking I/O) makes the host miss its heartbeats and be
killed; code that ends its process ends the host. Either way the run is
hosted afresh elsewhere, and does it again: one run would take down every
worker in turn, and the tries of other runs with them, each loss charged to
their tasks' `max_lost_workers`. So a run whose code was being run (an
activation in flight) when each of its last `MAX_HOST_LOSSES` hosts was lost
is parked, naming why, before it costs other runs their retries.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from coda import decide
from coda.errors import CodaError, ProtocolError, ValueTooLarge, WorkerLost
from coda.journal import codec
from coda.journal.events import ErrorInfo, Event, TaskFailed, TaskStarted
from coda.replay.engine import ReuseResult
from coda.runtime import faults
from coda.runtime.pool import WorkerHandle, WorkerPool
from coda.runtime.runs import LiveRun, Record, Stats
from coda.runtime.wire import decode_command, decode_error
from coda.state import RunState, RunStatus

__all__ = ["Activations"]

logger = logging.getLogger(__name__)


def _stuck(state: RunState) -> bool:
    """Whether a running run's current attempt has no step that may yet end:
    its code, waiting still, waits on something else."""
    running = state.status is RunStatus.RUNNING
    return running and next(state.open_steps(), None) is None


def _bookkeeping(event: Event) -> bool:
    """Events of tries that workflow code never sees (starts, retried failures)."""
    if isinstance(event, TaskStarted):
        return True
    return isinstance(event, TaskFailed) and event.retry_at is not None


class Activations:
    """The supervisor's activations of workflow instances, and their answers.

    It shares the supervisor's runs, pool and counters, and records through
    the supervisor's `record` (one run's events, acted on once durable).
    """

    # Hosts lost in a row with the run's code running before it is parked: the
    # first loss may be another's doing (a task that crashed the process);
    # the second in a row is the run's own. Tasks lose at most this many
    # tries to it, within their default `max_lost_workers` (2).
    MAX_HOST_LOSSES = 2

    def __init__(
        self,
        runs: dict[str, LiveRun],
        pool: WorkerPool,
        stats: Stats,
        *,
        record: Record,
        clock: Callable[[], float],
    ) -> None:
        self.runs = runs
        self.pool = pool
        self.stats = stats
        self._record = record
        self.clock = clock
        # Activation numbers, never reused while the supervisor runs (see the
        # header): an answer from a run's earlier LiveRun that took the number
        # of the activation in flight would be decided on in its place, and
        # if its host let that instance go, the real answer would be dropped
        # and the run left waiting for ever.
        self._numbers = itertools.count(1)

    def activate(self, run: LiveRun, *, early: bool = False) -> None:
        """Feed the run's instance what it has not seen of its durable history.

        `early` is for a new run only: its code may start on the submission
        before that is durable, since it acts on nothing itself.
        """
        if run.activating or run.reloading or run.state.status is not RunStatus.RUNNING:
            return
        limit = run.state.next_seq if early else run.durable
        host = run.host
        full = host is None or not host.alive
        if full and not early and not run.settled:
            # A new host must see the run's own steps and endings that are
            # still being written, or it would make them again; wait for them.
            return
        if full:
            host = self._pick_host()
            if host is None:
                return  # no worker yet; activated when one connects
            run.host = host
            host.hosted.add(run.run_id)
            # The instance needs neither starts nor retried failures of tries.
            events = [e for e in run.history if e.seq < limit and not _bookkeeping(e)]
            run.outbox = [e for e in run.outbox if e.seq >= limit]
        else:
            events = [e for e in run.outbox if e.seq < limit]
            if not events:
                return  # what is new is not durable yet
            run.outbox = run.outbox[len(events) :]
        assert host is not None
        run.activating = True
        run.activation = next(self._numbers)
        message: dict[str, Any] = {
            "op": "activate",
            "run": run.run_id,
            "n": run.activation,
            "full": full,
            "events": [codec.encode_dict(e) for e in events],
        }
        if full:
            # Only a new instance is made from them; a host that lost the
            # instance asks for a full activation (resync). The arguments are
            # the run's payload, in W1 an event of about a kilobyte that
            # three activations in four would carry for nothing.
            message["workflow"] = run.state.workflow
            message["args"] = run.state.args
        try:
            host.conn.send(message)
        except (ValueTooLarge, ProtocolError) as exc:
            # A history too large to send can never be hosted: park the run,
            # visibly, instead of failing the supervisor on every start.
            self.unhost(host, run.run_id)
            logger.error("run %s cannot be activated: %s", run.run_id, exc)
            error = ErrorInfo.from_exception(exc)
            self._record(run, decide.park(run.state, error, self.clock()))

    def _pick_host(self) -> WorkerHandle | None:
        workers = self.pool.workers
        if not workers:
            return None
        return min(workers, key=lambda w: len(w.hosted))

    def _answering(self, worker: WorkerHandle, msg: dict[str, Any]) -> LiveRun | None:
        """The run a host's answer is about, if it answers the activation in flight.

        Not if the run finished, was re-hosted or is being reread meanwhile,
        nor if the answer is to an earlier activation (one sent before the
        run was reread and hosted on the same worker again, say): acting on
        it would decide on code that saw another history.
        """
        run = self.runs.get(msg["run"])
        if run is None or run.host is not worker or run.reloading:
            return None
        answered = msg.get("n")
        if answered is not None and answered != run.activation:
            return None
        run.host_losses = 0  # its code answered: whatever kills hosts, not that
        return run

    def on_commands(self, worker: WorkerHandle, msg: dict[str, Any]) -> None:
        run = self._answering(worker, msg)
        if run is None:
            return  # that host, or the next activation, will answer
        run.activating = False
        if msg.get("finished"):
            # The run ended or its code returned, and the host let the
            # instance go: nothing to drop once the run ends; should the run
            # go on after all (its completion not recorded), it is hosted
            # afresh from its history.
            self.unhost(worker, run.run_id)
        commands = [decode_command(c) for c in msg["commands"]]
        events = decide.on_commands(run.state, commands, self.clock())
        self.stats.tasks_reused += sum(isinstance(c, ReuseResult) for c in commands)
        if events:
            self._record(run, events)
        elif run.outbox:
            self.activate(run)
        elif not commands and _stuck(run.state):
            self._park_stuck(run)

    def _park_stuck(self, run: LiveRun) -> None:
        """The run's code waits, and nothing it could wait for is coming."""
        run_id = run.run_id
        error = ErrorInfo.from_exception(
            CodaError(
                f"run {run_id} is stuck: its workflow code waits, and no task of "
                "it is in flight or due, so nothing will wake it (workflow code "
                "may await only the tasks it spawns and coda.context's values; "
                "an asyncio future or event that nothing sets never resolves). "
                f"Fix the code, then `coda resume {run_id}`"
            )
        )
        self._park(run, error)

    def _park(self, run: LiveRun, error: ErrorInfo, then: str = "") -> None:
        """Park the run with `error`, said in the log (with `then`, what to do)."""
        logger.error("run %s parked: %s%s", run.run_id, error.message, then)
        self.stats.parked += 1
        self._record(run, decide.park(run.state, error, self.clock()))

    def unhost(self, worker: WorkerHandle, run_id: str) -> LiveRun | None:
        """Take a run away from the worker hosting it; None if it does not."""
        run = self.runs.get(run_id)
        if run is None or run.host is not worker:
            return None  # finished, or re-hosted meanwhile
        run.activating = False
        worker.hosted.discard(run_id)
        run.host = None
        return run

    def host_lost(self, worker: WorkerHandle) -> dict[str, LiveRun]:
        """Take every run from a worker that was lost; park those whose code
        it was running when each of their last `MAX_HOST_LOSSES` hosts went."""
        taken: dict[str, LiveRun] = {}
        running_code: list[LiveRun] = []
        # A crash point (`coda.runtime.faults`, armed by tests) ends a worker
        # at the n-th time it passes there, whatever code it is running: not
        # the run's doing.
        returncode = getattr(worker.process, "returncode", None)
        injected = returncode == faults.CRASH_EXIT_CODE
        for run_id in list(worker.hosted):
            run = self.runs.get(run_id)
            if run is None or run.host is not worker:
                continue
            if run.activating and not injected:
                running_code.append(run)
            run.host, run.activating = None, False
            taken[run_id] = run
        worker.hosted.clear()
        if running_code:
            # A worker runs the activations it is sent one after the other,
            # answering each before the next: of those it had not answered,
            # the first sent is the one whose code was running; the others
            # waited behind it (behind a blocked loop, say) and are not to
            # blame. Answers sent before it died were read before its loss.
            culprit = min(running_code, key=lambda run: run.activation)
            culprit.host_losses += 1
            logger.warning(
                "worker %s was lost (%s) while running the workflow code of run %s",
                worker.name,
                worker.lost_reason or "?",
                culprit.run_id,
            )
            if culprit.host_losses >= self.MAX_HOST_LOSSES:
                self._park_host_killer(culprit, worker)
        return taken

    def _park_host_killer(self, run: LiveRun, worker: WorkerHandle) -> None:
        run_id = run.run_id
        error = ErrorInfo.from_exception(
            WorkerLost(
                f"the workflow code of run {run_id} was running on each of the "
                f"last {run.host_losses} workers lost (the last: "
                f"{worker.lost_reason or 'it ended'}): workflow code must neither "
                "block its worker (time.sleep, blocking I/O: move that into a "
                "task, or use asyncio) nor end its process. Fix the code, then "
                f"`coda resume {run_id}`"
            )
        )
        self._park(run, error)

    def on_resync(self, worker: WorkerHandle, msg: dict[str, Any]) -> None:
        """The host lost the run's instance: send it the whole history again."""
        run = self._answering(worker, msg)
        if run is not None:
            self.unhost(worker, run.run_id)
            self.activate(run)

    def on_diverged(self, worker: WorkerHandle, msg: dict[str, Any]) -> None:
        run = self._answering(worker, msg)
        if run is None:
            return
        self.unhost(worker, run.run_id)
        then = (
            f". Deploy fixed code, then `coda resume {run.run_id}` or restart "
            "`coda run`"
        )
        self._park(run, decode_error(msg["error"]), then)
