"""The supervisor: the one process that owns the journal and decides.

Theory of operation
-------------------
Workers run code; clients ask for runs; the supervisor turns what they say
into events, appends them to the journal, and only then acts on them. Its
in-memory state is the fold of the unfinished runs' events (`coda.state`);
every decision goes through `coda.decide`, which applies each event to that
state as it makes it. So the state is always "the journal plus what is being
committed now", and a restart rebuilds it by folding the journal again.

The write-ahead rule, concretely:

* a try is sent to a worker only after its `TaskScheduled` and `TaskStarted`
  are durable;
* a workflow instance is fed a result, and a client is told of a submission or
  a run's end, only after the event saying so is durable.

Every append goes through the journal's group commit, so decisions made while
a transaction is being written share the next one.

The supervisor owns three parts, which share its runs (`coda.runtime.runs`)
and record through it: what clients ask for (submit, wait, cancel, reopen) is
answered by `Requests` (`coda.runtime.requests`); the dispatch of tries (the
ready queue, tries in flight, outcomes, lost workers, timeouts) is the
`Dispatcher`'s (`coda.runtime.dispatch`); and the workflow instances hosted
by workers are fed their runs' histories, and their commands taken, by
`Activations` (`coda.runtime.activation`). It keeps the committing, what
follows a change of a run (finishing it, scheduling its steps, timers, which
worker hosts it), recovery and shutdown.

A failed append. The journal refused a batch (a full disk): the runs it
touched are ahead of the journal in memory. They are reread from it after a
moment; meanwhile nothing is decided for them, since it could not continue
their histories. Outcomes arriving for them are dropped, and once reread their
tries that the journal has started and no worker holds run again.

Recovery. At start-up every unfinished run is folded from the journal; tries
that were running when the last supervisor died are recorded as interrupted
(they run again, at no cost to their retry budget), parked runs are resumed on
the code deployed now, and everything due is scheduled.

Shutdown (SIGINT, SIGTERM). Stop taking clients, stop the workers, record the
tries still running as interrupted, close the journal. Nothing acknowledged is
lost; the interrupted tries run again at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from coda import decide
from coda.definitions import Registry
from coda.errors import CodaError, JournalError
from coda.journal.base import Journal, RunSummary, summarize
from coda.journal.events import AttemptFailed, Event, TaskFailed, TaskScheduled
from coda.runtime import faults
from coda.runtime.activation import Activations
from coda.runtime.dispatch import Dispatcher
from coda.runtime.pool import WorkerHandle, WorkerPool
from coda.runtime.requests import Requests
from coda.runtime.runs import FinishedRuns, LiveRun, Stats, feeds
from coda.state import IllegalEvent, RunState, RunStatus, StepStatus, fold

__all__ = ["Supervisor"]

logger = logging.getLogger(__name__)


def _has_pending_steps(state: RunState) -> bool:
    """Whether a step of the current attempt waits for a try or runs one."""
    return any(
        step.attempt == state.attempt
        and step.status
        in (StepStatus.SCHEDULED, StepStatus.STARTED, StepStatus.BACKOFF)
        for step in state.steps.values()
    )


class Supervisor:
    def __init__(
        self,
        journal: Journal,
        app: str,
        registry: Registry,
        *,
        workers: int,
        worker_threads: int | None = None,
        max_tries_per_worker: int = 64,
        clock: Callable[[], float] = time.time,
        worker_env: dict[str, str] | None = None,
        log_level: str = "WARNING",
        default_task_timeout: float | None = 300.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
    ) -> None:
        self.journal = journal
        self.registry = registry
        self.clock = clock
        self.runs: dict[str, LiveRun] = {}
        self.stats = Stats()
        self.pool = WorkerPool(
            app,
            workers,
            on_message=self._on_worker_message,
            on_lost=self._on_worker_lost,
            on_ready=self._on_worker_ready,
            # A thread for every try a worker may hold, unless told otherwise:
            # a plain-def try must never wait for a thread while its
            # start-to-close timeout runs.
            threads=worker_threads or max_tries_per_worker,
            env=worker_env,
            log_level=log_level,
        )
        self._waiters: dict[str, list[asyncio.Future[RunSummary]]] = {}
        self.finished = FinishedRuns()
        self._background: set[asyncio.Task[Any]] = set()
        self._queue_events: list[Event] = []
        self._queue_jobs: list[
            tuple[list[LiveRun], Callable[[], None] | None, asyncio.Future[bool]]
        ] = []
        self._flush_scheduled = False
        # A flush put off for a new run's first commands (see `_write`).
        self._linger: asyncio.TimerHandle | None = None
        self._last_batch: asyncio.Future[None] | None = None
        self._stopping = False
        # The event loop it runs on, from `start`.
        self._loop: asyncio.AbstractEventLoop | None = None

        # The dispatch of tries. Queueing a step, pumping the ready queue and
        # taking an outcome happen for nearly every event: bound once here.
        self.dispatcher = Dispatcher(
            self.runs,
            self.pool,
            self.stats,
            write=self._write,
            record=self._record,
            clock=clock,
            max_tries_per_worker=max_tries_per_worker,
            default_task_timeout=default_task_timeout,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
        )
        self._queue = self.dispatcher.queue
        self._pump = self.dispatcher.pump
        self._on_outcome = self.dispatcher.on_outcome

        # Workflow activations. Activating a run and taking its host's
        # commands happen for nearly every event: bound once here too.
        self.activations = Activations(
            self.runs, self.pool, self.stats, record=self._record, clock=clock
        )
        self._activate = self.activations.activate
        self._on_commands = self.activations.on_commands

        # What clients ask for is answered by `Requests`; the server asks the
        # supervisor, whose names for it are bound here (no call in between).
        self.requests = Requests(
            self.runs,
            self._waiters,
            self.finished,
            self.stats,
            journal=journal,
            registry=registry,
            clock=clock,
            record=self._record,
            activate=self._activate,
        )
        self.submit = self.requests.submit
        self.submit_fresh = self.requests.submit_fresh
        self.settle_submission = self.requests.settle_submission
        self.waiter = self.requests.waiter
        self.wait = self.requests.wait
        self.cancel = self.requests.cancel
        self.reopen = self.requests.reopen

    # Start-up and shutdown.

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Workers take a while to import the app: start them while the journal
        # is read and folded.
        workers = asyncio.create_task(self.pool.start())
        try:
            await self._recover()
        finally:
            await workers
        # Tries first: a recovered run whose steps are due or running needs
        # no workflow code to go on, and is activated when a result arrives.
        idle = []
        for run in list(self.runs.values()):
            self._scan(run)
            if not _has_pending_steps(run.state):
                idle.append(run)
        self._pump()
        for run in idle:
            self._after_change(run)
        self.dispatcher.start()

    async def _recover(self) -> None:
        started = time.perf_counter()
        histories = await self.journal.unfinished()
        now = self.clock()
        batch: list[Event] = []
        for run_id, history in histories.items():
            try:
                state = fold(history)
            except IllegalEvent as exc:
                logger.error(
                    "run %s cannot be recovered, its history is inconsistent: %s; "
                    "run `coda doctor` on the journal. Leaving it untouched.",
                    run_id,
                    exc,
                )
                continue
            assert state is not None
            run = LiveRun(state, list(history), durable=len(history))
            events = decide.interrupt_started(state, now, "the supervisor restarted")
            events += decide.resume(state, "the supervisor restarted", now)
            events += decide.start_attempt(state, now)
            run.history += events
            batch += events
            self.runs[run_id] = run
        if batch:
            await self._commit(batch)
        # What recovery decided is durable now. A run's first activation waits
        # for all its history to be (`LiveRun.settled`); a run with no task to
        # dispatch (its next attempt due, say) would otherwise wait for ever.
        for run in self.runs.values():
            run.durable = len(run.history)
        logger.info(
            "recovered %d unfinished runs in %.3fs",
            len(self.runs),
            time.perf_counter() - started,
        )

    async def stop(self) -> None:
        """Stop cleanly: nothing acknowledged is lost, running tries are interrupted."""
        if self._stopping:
            return
        self._stopping = True
        faults.crash_point("supervisor.shutdown")
        self.dispatcher.stop()
        await self.pool.close()
        if self._linger is not None:
            self._flush()  # a submission lingering for its first commands
        while self._last_batch is not None and not self._last_batch.done():
            await asyncio.wait([self._last_batch])  # keep what was decided
        now = self.clock()
        batch: list[Event] = []
        for run in self.runs.values():
            if run.timer is not None:
                run.timer.cancel()
            events = decide.interrupt_started(run.state, now, "the supervisor stopped")
            run.history += events
            batch += events
        if batch:
            try:
                await self._commit(batch)
            except JournalError as exc:
                # Nothing is lost: the next start records every try that the
                # journal has started and not ended as interrupted.
                logger.error(
                    "could not record the tries running at shutdown as "
                    "interrupted (%s); the next start will",
                    exc,
                )
        for task in list(self._background):
            task.cancel()
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
        logger.info("supervisor stopped; %d runs unfinished", len(self.runs))

    # Committing.
    #
    # Decisions are made at once, in memory; their events queue here, and once
    # per turn of the event loop everything queued goes to the journal as one
    # append (which the journal's group commit may merge further). What waited
    # on those events (send a task, feed an instance, answer a client) runs
    # once they are durable, batch after batch in the order they were decided,
    # while the next batches are already being encoded and written.
    #
    # One exception to "once per turn": a submission whose workflow code was
    # started early (see `Requests.submit`) lingers, for up to LINGER seconds,
    # when nothing else is queued. The run's first commands come back from its
    # host in a fraction of that, and the submission and the first steps then
    # share one commit instead of taking two fsyncs one after the other;
    # nothing is told or sent before either is durable, as always.

    LINGER = 0.002

    def _write(
        self,
        events: list[Event],
        runs: Iterable[LiveRun],
        then: Callable[[], None] | None = None,
        *,
        linger: bool = False,
    ) -> asyncio.Future[bool]:
        """Queue events for the journal; the future says whether they are durable."""
        loop = self._loop or asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._queue_events += events
        self._queue_jobs.append((list(runs), then, done))
        if linger and not self._flush_scheduled:
            if self._linger is None:
                self._linger = loop.call_later(self.LINGER, self._flush)
        elif not self._flush_scheduled:
            self._flush_scheduled = True  # `_flush` also ends any linger
            loop.call_soon(self._flush)
        return done

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        events, self._queue_events = self._queue_events, []
        jobs, self._queue_jobs = self._queue_jobs, []
        batch = asyncio.ensure_future(self._write_batch(events, jobs, self._last_batch))
        self._last_batch = batch
        self._background.add(batch)
        batch.add_done_callback(self._background_done)

    async def _write_batch(
        self,
        events: list[Event],
        jobs: list[tuple[list[LiveRun], Callable[[], None] | None, Any]],
        previous: asyncio.Future[None] | None,
    ) -> None:
        error: JournalError | None = None
        try:
            if events:
                await self._commit(events)
        except JournalError as exc:
            error = exc
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        touched: dict[str, LiveRun] = {}
        if error is None:
            runs = self.runs
            for event in events:
                live = runs.get(event.run_id)
                if live is not None and live.durable <= event.seq:
                    live.durable = event.seq + 1
                    touched[event.run_id] = live
        else:
            logger.error(
                "journal append of %d events failed: %s; the runs concerned are "
                "reloaded from the journal",
                len(events),
                error,
            )
            self.requests.journal_error = error
            self._recover_from(jobs)
            return
        for _, then, done in jobs:
            if then is not None:
                try:
                    then()
                except Exception:
                    logger.exception("supervisor step after a commit failed")
            if not done.done():
                done.set_result(True)
        # A run waiting for a host gets one once all its events are durable
        # (see `Activations.activate`), whichever commit that was.
        for live in touched.values():
            if live.host is None and live.settled:
                self._activate(live)

    def _recover_from(
        self, jobs: list[tuple[list[LiveRun], Callable[[], None] | None, Any]]
    ) -> None:
        runs = {run.run_id: run for job in jobs for run in job[0]}
        # Their state in memory is ahead of the journal: whatever is decided
        # on it would not continue their histories, and would only fail again.
        # Outcomes that arrive meanwhile are dropped; their tries are found
        # started and not held by any worker once reread, and run again.
        for run in runs.values():
            run.reloading = True
        for _, _, done in jobs:
            if not done.done():
                done.set_result(False)
        # Reloaded after a moment, so that a full disk gets a chance to drain,
        # and outside the chain of batches, which goes on meanwhile.
        self._spawn(self._reload_later(list(runs.values())))

    async def _reload_later(self, runs: list[LiveRun]) -> None:
        await asyncio.sleep(1.0)
        for run in runs:
            if self.runs.get(run.run_id) is not run:
                # Finished meanwhile, or a refused submission: no try of it is
                # of use any more.
                self.dispatcher.reconcile_tries(run.run_id, None)
                continue
            await self._reload(run)
            if self.runs.get(run.run_id) is not run:
                self.dispatcher.reconcile_tries(run.run_id, None)
                continue  # gone, or submitted anew
            self.dispatcher.rerun_orphans(run)
            self._after_change(run, None)

    async def _commit(self, events: list[Event]) -> None:
        faults.crash_point("supervisor.before_commit")
        await self.journal.append(events)
        self.stats.commits += 1
        self.stats.events += len(events)
        faults.crash_point("supervisor.after_commit")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("supervisor step failed", exc_info=task.exception())

    def _record(
        self, run: LiveRun, events: list[Event], *, linger: bool = False
    ) -> asyncio.Future[bool]:
        """Queue one run's new events; act on them once durable.

        A run being reread records nothing (the future says False at once).
        """
        if not events or run.reloading:
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            done.set_result(not run.reloading)
            return done
        run.history += events
        run.outbox += [e for e in events if feeds(e)]
        done = self._write(
            events, (run,), lambda: self._after_change(run, events), linger=linger
        )
        # Steps scheduled here can start at once: their TaskStarted events join
        # the same append, and the tries go out only once both are durable.
        scheduled = [e for e in events if isinstance(e, TaskScheduled)]
        if scheduled and run.state.status is RunStatus.RUNNING:
            for event in scheduled:
                step = run.state.steps[(event.attempt, event.step)]
                if step.status is StepStatus.SCHEDULED:
                    self._queue(run, step)
            self._pump()
        return done

    async def _reload(self, run: LiveRun) -> None:
        # The in-memory state ran ahead of the journal; fold what is durable.
        try:
            history = await self.journal.history(run.run_id)
        except CodaError:
            logger.exception("run %s: cannot reread its history", run.run_id)
            run.reloading = False  # go on from memory, as best we can
            return
        state = fold(history)
        if state is None:
            # A submission the journal refused: nothing of the run is durable,
            # and `Requests.submit` told its client so.
            if self.runs.get(run.run_id) is run:
                self.requests.forget_unrecorded(run.run_id)
            return
        run.state, run.history, run.outbox = state, history, []
        if run.host is not None:
            # Its instance saw what the journal did not keep: start afresh.
            run.host.hosted.discard(run.run_id)
            if run.host.alive:
                run.host.conn.send({"op": "drop", "run": run.run_id})
        run.activating, run.host = False, None
        run.durable = len(history)
        run.reloading = False
        if state.status.finished:
            # Tries of steps whose start was not durable may still be out.
            self._finish(run, every_try=True)

    # Reacting to a run's change: finish, activate, schedule, set timers.

    def _after_change(self, run: LiveRun, events: list[Event] | None = None) -> None:
        """Act on a run's committed `events` (None: look at the whole run)."""
        state = run.state
        if state.status.finished or state.status is RunStatus.PARKED:
            # Tell nobody before the ending is durable; the commit carrying it
            # comes back here.
            if run.settled:
                if state.status.finished:
                    self._finish(run)
                else:
                    self._notify(run)
            return
        if events is None:
            self._scan(run)
        else:
            for event in events:
                if isinstance(event, TaskScheduled):
                    step = state.steps[(event.attempt, event.step)]
                    if step.status is StepStatus.SCHEDULED:
                        self._queue(run, step)
                elif (isinstance(event, TaskFailed) and event.retry_at is not None) or (
                    isinstance(event, AttemptFailed) and event.retry_at is not None
                ):
                    self._set_timer(run, event.retry_at)
        if run.outbox or (state.status is RunStatus.RUNNING and run.host is None):
            self._activate(run)
        self._pump()

    def _scan(self, run: LiveRun) -> None:
        """Queue every due step of the run and set its timer for the next one."""
        state = run.state
        now = self.clock()
        for step in decide.due_steps(state, now):
            self._queue(run, step)
        later = [
            s.retry_at
            for s in state.steps.values()
            if s.status is StepStatus.BACKOFF and s.retry_at and s.retry_at > now
        ]
        if state.status is RunStatus.RETRYING and state.retry_at is not None:
            later.append(state.retry_at)
        if later:
            self._set_timer(run, min(later))

    def _set_timer(self, run: LiveRun, when: float) -> None:
        if run.timer is not None:
            if (
                run.timer.when()
                <= asyncio.get_running_loop().time() + when - self.clock()
            ):
                return  # an earlier timer will scan the run anyway
            run.timer.cancel()
        delay = max(0.0, when - self.clock())
        loop = asyncio.get_running_loop()
        run.timer = loop.call_later(delay, self._on_timer, run.run_id)

    def _on_timer(self, run_id: str) -> None:
        run = self.runs.get(run_id)
        if run is None or self._stopping:
            return
        run.timer = None
        events = decide.start_attempt(run.state, self.clock())
        if events:
            self._record(run, events)
        self._scan(run)
        self._pump()

    def _finish(self, run: LiveRun, *, every_try: bool = False) -> None:
        state = run.state
        self.runs.pop(run.run_id, None)
        if run.timer is not None:
            run.timer.cancel()
        if run.host is not None:
            run.host.hosted.discard(run.run_id)
            if run.host.alive:
                run.host.conn.send({"op": "drop", "run": run.run_id})
        # Tries still running for a run that ended are of no use any more. A
        # worker holds a try only while its step is started (unless the state
        # was just reread from the journal: `every_try`), so most runs, whose
        # steps all ended, need no look through every try in flight.
        started = (s.status is StepStatus.STARTED for s in state.steps.values())
        if every_try or any(started):
            self.dispatcher.cancel_tries(run.run_id)
        if state.status is RunStatus.COMPLETED:
            _warn_unawaited(state)
        counter = state.status.value
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        summary = summarize(state)
        self.finished.add(summary)
        self._notify(run, summary)
        logger.debug("run %s %s", run.run_id, counter)

    def _notify(self, run: LiveRun, summary: RunSummary | None = None) -> None:
        """Tell the run's waiters its `summary` (made from its state if None)."""
        waiters = self._waiters.pop(run.run_id, None)
        if waiters:
            summary = summary or summarize(run.state)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(summary)

    # Workers.

    def _on_worker_message(self, worker: WorkerHandle, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "outcome":
            self._on_outcome(worker, msg)
        elif op == "commands":
            self._on_commands(worker, msg)
        elif op == "diverged":
            self.activations.on_diverged(worker, msg)
        elif op == "resync":
            self.activations.on_resync(worker, msg)
        elif op == "pong":
            worker.last_pong = time.monotonic()
        else:
            logger.warning("worker %s sent unknown message %r", worker.name, op)

    def _on_worker_ready(self, worker: WorkerHandle) -> None:
        """A worker joined: host the runs that wait for one, and send it tries.

        Without this, a run whose host died while no other worker was alive (one
        worker, or all of them lost at once) would wait for an unrelated event.
        """
        if self._stopping:
            return
        for run in list(self.runs.values()):
            if run.host is None and run.state.status is RunStatus.RUNNING:
                self._activate(run)
        self._pump()

    async def _on_worker_lost(self, worker: WorkerHandle) -> None:
        """Reschedule a dead worker's tries and re-host its runs.

        Who pays for the tries is said in `Dispatcher.reschedule_lost`.
        """
        self.stats.workers_lost += 1
        durable, touched = self.dispatcher.reschedule_lost(worker)
        touched.update(self.activations.host_lost(worker))
        if not await durable:
            return  # the runs were reloaded from the journal
        for run in touched.values():
            if run.run_id in self.runs:
                self._after_change(run, None)
        # Runs that wait for any worker to host them.
        for run in list(self.runs.values()):
            if run.host is None and run.state.status is RunStatus.RUNNING:
                self._activate(run)

    def live_runs(self) -> Iterable[LiveRun]:
        return self.runs.values()


def _warn_unawaited(state: RunState) -> None:
    """Say so when a run completed with tasks its code spawned and never awaited.

    They were scheduled, durably, and end unrun (or cancelled if running)
    with the run: nothing else would tell the workflow's author why.
    """
    open_steps = sorted(state.open_steps(), key=lambda step: step.step)
    if open_steps:
        named = ", ".join(f"step {s.step} ({s.task})" for s in open_steps[:5])
        logger.warning(
            "run %s completed with %d task(s) its workflow spawned and did not "
            "await: %s%s; they are not run (or are cancelled) now that the run "
            "has ended. Await every task a workflow spawns (asyncio.gather for "
            "several)",
            state.run_id,
            len(open_steps),
            named,
            " ..." if len(open_steps) > 5 else "",
        )
