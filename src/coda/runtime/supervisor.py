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

Workflow instances are hosted by workers. A run sticks to the worker that
hosts it, which is fed only the run's new outcomes (`_FEEDS`); when that worker
dies, another is sent the whole history and replays it. At most one activation
per run is in flight, so an instance never sees events out of order, and each
carries a number that the host's answer repeats: an answer to an earlier one
(sent before the run was reread, say) is stale and dropped.

A new run's workflow code starts while its submission is being written (it
acts on nothing itself), and the submission lingers, up to `LINGER`, for the
code's first commands, so that both go out in one commit.

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

TODO: this module is half as long again as the ~800 lines a module should
stay under, which makes it slow to review. The parts to move out, each into a
class the supervisor owns: what clients ask for (submit, wait, cancel,
reopen), and the dispatch of tries (pump, outcomes, lost workers, timeouts).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from coda import decide
from coda.definitions import Registry, WorkflowDef
from coda.errors import (
    CodaError,
    Interrupted,
    JournalError,
    ProtocolError,
    RunIdConflict,
    RunNotFound,
    TaskTimeout,
    ValueTooLarge,
)
from coda.journal import codec
from coda.journal.base import Journal, RunSummary, summarize
from coda.journal.events import (
    AttemptFailed,
    AttemptStarted,
    ErrorInfo,
    Event,
    RunCancelled,
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    TaskStarted,
)
from coda.replay.engine import ReuseResult
from coda.runtime import faults
from coda.runtime.pool import TryKey, WorkerHandle, WorkerPool
from coda.runtime.wire import decode_command, decode_error
from coda.state import IllegalEvent, RunState, RunStatus, StepState, StepStatus, fold

__all__ = ["Supervisor"]

logger = logging.getLogger(__name__)


def _is_due(state: RunState, step: StepState, now: float) -> bool:
    if step.attempt != state.attempt or state.status.finished:
        return False
    if step.status is StepStatus.SCHEDULED:
        return True
    return step.status is StepStatus.BACKOFF and (step.retry_at or 0.0) <= now


def _same_workflow(run_id: str, existing: str, asked: str) -> None:
    """A run id names one run: asking for it with another workflow is an error."""
    if existing != asked:
        raise RunIdConflict(
            f"run id {run_id} is taken by a run of workflow {existing!r}, not "
            f"{asked!r}; choose another id"
        )


def _has_pending_steps(state: RunState) -> bool:
    """Whether a step of the current attempt waits for a try or runs one."""
    return any(
        step.attempt == state.attempt
        and step.status
        in (StepStatus.SCHEDULED, StepStatus.STARTED, StepStatus.BACKOFF)
        for step in state.steps.values()
    )


def _bookkeeping(event: Event) -> bool:
    """Events of tries that workflow code never sees (starts, retried failures)."""
    if isinstance(event, TaskStarted):
        return True
    return isinstance(event, TaskFailed) and event.retry_at is not None


def _feeds(event: Event) -> bool:
    """Whether a hosting instance needs this event (it made the others itself)."""
    if isinstance(event, TaskFailed):
        return event.retry_at is None
    return isinstance(event, (AttemptStarted, TaskCompleted, RunCancelled))


@attrs.define(eq=False)
class LiveRun:
    """An unfinished run in memory: its state, history and hosting."""

    state: RunState
    history: list[Event]
    host: WorkerHandle | None = None
    outbox: list[Event] = attrs.field(factory=list)
    activating: bool = False
    timer: asyncio.TimerHandle | None = None
    # Events at positions below this are durable. The state runs ahead of it
    # while decisions are being written; only what is durable may be told.
    durable: int = 0
    # The number of the last activation sent; a host's answer names the one
    # it answers, and answers to earlier ones are stale.
    activation: int = 0
    # An append of the run's failed and its state is being reread from the
    # journal: nothing is decided for it meanwhile (see `_recover_from`).
    reloading: bool = False

    @property
    def run_id(self) -> str:
        return self.state.run_id

    @property
    def settled(self) -> bool:
        """Whether everything decided for the run is durable."""
        return self.durable >= self.state.next_seq


@attrs.define
class Stats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    parked: int = 0
    tasks_dispatched: int = 0
    tasks_reused: int = 0
    workers_lost: int = 0
    commits: int = 0
    events: int = 0


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
        self.default_task_timeout = default_task_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.registry = registry
        self.clock = clock
        self.max_tries_per_worker = max_tries_per_worker
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
        # Steps waiting for a worker with room, in the order they became due.
        self._ready: collections.deque[tuple[str, int, int]] = collections.deque()
        self._queued: set[tuple[str, int, int]] = set()
        # Steps whose last try died with others on one worker: they run alone.
        self._suspects: set[tuple[str, int, int]] = set()
        self._waiters: dict[str, list[asyncio.Future[RunSummary]]] = {}
        self._submitting: dict[str, asyncio.Future[Any]] = {}
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
        # The last append the journal refused, for those who ask why.
        self.journal_error: JournalError | None = None
        # The event loop it runs on, from `start`.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task[None] | None = None

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
        self._watchdog = asyncio.create_task(self._watch_timeouts())

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
        if self._watchdog is not None:
            self._watchdog.cancel()
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
    # started early (see `submit`) lingers, for up to LINGER seconds, when
    # nothing else is queued. The run's first commands come back from its
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
            self.journal_error = error
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
        # (see `_activate`), whichever commit that was.
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
                self._reconcile_tries(run.run_id, None)
                continue
            await self._reload(run)
            if self.runs.get(run.run_id) is not run:
                self._reconcile_tries(run.run_id, None)
                continue  # gone, or submitted anew
            orphans = self._reconcile_tries(run.run_id, run.state)
            # A try whose start is durable but which no worker runs any more
            # (its outcome arrived and could not be recorded) runs again.
            error = ErrorInfo.from_exception(
                Interrupted("its outcome could not be recorded; it runs again")
            )
            events: list[Event] = []
            for step in orphans:
                events += decide.on_task_failure(
                    run.state,
                    step.attempt,
                    step.step,
                    step.try_number,
                    error,
                    self.clock(),
                )
            if events:
                self._record(run, events)
            self._after_change(run, None)

    def _reconcile_tries(self, run_id: str, state: RunState | None) -> list[StepState]:
        """Keep the workers' tries of a run that its durable state knows running;
        return the steps that state has running with no worker holding them."""
        held: set[tuple[int, int, int]] = set()
        for worker in self.pool.workers:
            for key in [k for k in worker.tries if k[0] == run_id]:
                step = state.steps.get(key[1:3]) if state is not None else None
                running = (
                    step is not None
                    and step.status is StepStatus.STARTED
                    and step.try_number == key[3]
                )
                if running:
                    held.add(key[1:])
                else:
                    # Its slot is counted free from now on: the worker must
                    # not keep a thread busy with it (nor report it).
                    del worker.tries[key]
                    if worker.alive:
                        worker.conn.send(
                            {"op": "cancel", "run": run_id, "try": list(key[1:])}
                        )
                    if worker.exclusive:
                        worker.exclusive = False
        if state is None:
            return []
        return [
            step
            for step in state.steps.values()
            if step.status is StepStatus.STARTED
            and (step.attempt, step.step, step.try_number) not in held
        ]

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
        run.outbox += [e for e in events if _feeds(e)]
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
            # and `submit` told its client so.
            if self.runs.get(run.run_id) is run:
                self._forget_unrecorded(run.run_id)
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

    def _queue(self, run: LiveRun, step: StepState) -> None:
        key = (run.run_id, step.attempt, step.step)
        if key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)

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
            run_id = run.run_id
            for worker in self.pool.workers:
                mine = [key for key in worker.tries if key[0] == run_id]
                if mine:
                    for key in mine:
                        del worker.tries[key]
                    if worker.alive:
                        worker.conn.send({"op": "cancel", "run": run_id})
        counter = state.status.value
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self._notify(run)
        logger.debug("run %s %s", run.run_id, counter)

    def _notify(self, run: LiveRun) -> None:
        waiters = self._waiters.pop(run.run_id, None)
        if waiters:
            summary = summarize(run.state)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(summary)

    # Workflow activations.

    def _activate(self, run: LiveRun, *, early: bool = False) -> None:
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
        run.activation += 1
        message = {
            "op": "activate",
            "run": run.run_id,
            "n": run.activation,
            "workflow": run.state.workflow,
            "args": run.state.args,
            "full": full,
            "events": [codec.encode_dict(e) for e in events],
        }
        try:
            host.conn.send(message)
        except (ValueTooLarge, ProtocolError) as exc:
            # A history too large to send can never be hosted: park the run,
            # visibly, instead of failing the supervisor on every start.
            self._unhost(host, run.run_id)
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
        return run

    def _on_commands(self, worker: WorkerHandle, msg: dict[str, Any]) -> None:
        run = self._answering(worker, msg)
        if run is None:
            return  # that host, or the next activation, will answer
        run.activating = False
        commands = [decode_command(c) for c in msg["commands"]]
        events = decide.on_commands(run.state, commands, self.clock())
        self.stats.tasks_reused += sum(isinstance(c, ReuseResult) for c in commands)
        if events:
            self._record(run, events)
        elif run.outbox:
            self._activate(run)

    def _unhost(self, worker: WorkerHandle, run_id: str) -> LiveRun | None:
        """Take a run away from the worker hosting it; None if it does not."""
        run = self.runs.get(run_id)
        if run is None or run.host is not worker:
            return None  # finished, or re-hosted meanwhile
        run.activating = False
        worker.hosted.discard(run_id)
        run.host = None
        return run

    def _on_resync(self, worker: WorkerHandle, msg: dict[str, Any]) -> None:
        """The host lost the run's instance: send it the whole history again."""
        run = self._answering(worker, msg)
        if run is not None:
            self._unhost(worker, run.run_id)
            self._activate(run)

    def _on_diverged(self, worker: WorkerHandle, msg: dict[str, Any]) -> None:
        run = self._answering(worker, msg)
        if run is None:
            return
        self._unhost(worker, run.run_id)
        error = decode_error(msg["error"])
        logger.error(
            "run %s parked: %s. Deploy fixed code, then `coda resume %s` or "
            "restart `coda run`",
            run.run_id,
            error.message,
            run.run_id,
        )
        self.stats.parked += 1
        self._record(run, decide.park(run.state, error, self.clock()))

    # Tasks.

    def _pump(self) -> None:
        """Start due steps on workers with room: one commit, then send them.

        A suspect step (it was on a worker that died with other tries) runs
        alone on a worker, so that a task that kills its worker is found out
        and charged, and the tasks that merely shared the worker are not.
        """
        if self._stopping or not self._ready:
            return
        now = self.clock()
        starts: list[tuple[WorkerHandle, LiveRun, StepState]] = []
        events: list[Event] = []
        deferred: list[tuple[str, int, int]] = []
        while self._ready:
            open_workers = [
                w
                for w in self.pool.workers
                if w.alive
                and not w.exclusive
                and len(w.tries) < self.max_tries_per_worker
            ]
            if not open_workers:
                break
            key = self._ready.popleft()
            run = self.runs.get(key[0])
            step = run.state.steps.get((key[1], key[2])) if run else None
            if (
                run is None
                or run.reloading  # scanned again once reread
                or step is None
                or not _is_due(run.state, step, now)
            ):
                self._queued.discard(key)
                continue
            if key in self._suspects:
                idle = [w for w in open_workers if not w.tries]
                if not idle:
                    deferred.append(key)
                    continue
                worker = idle[0]
                worker.exclusive = True
            else:
                worker = min(open_workers, key=lambda w: len(w.tries))
            self._queued.discard(key)
            started = decide.start_task(run.state, step, worker.name, now)
            run.history += started
            events += started
            timeout = step.timeout or self.default_task_timeout
            worker.tries[(run.run_id, step.attempt, step.step, step.try_number)] = (
                now + timeout if timeout else None
            )
            starts.append((worker, run, step))
        self._ready.extendleft(reversed(deferred))
        if starts:
            runs = {run.run_id: run for _, run, _ in starts}.values()
            self._write(events, runs, lambda: self._send_tries(starts))

    def _send_tries(
        self, starts: list[tuple[WorkerHandle, LiveRun, StepState]]
    ) -> None:
        """Hand tries to their workers, now that their starts are durable."""
        for worker, run, step in starts:
            key = (run.run_id, step.attempt, step.step, step.try_number)
            if not worker.alive or key not in worker.tries:
                continue  # lost meanwhile: the loss rescheduled it
            worker.conn.send(
                {
                    "op": "task",
                    "run": run.run_id,
                    "attempt": step.attempt,
                    "step": step.step,
                    "try": step.try_number,
                    "task": step.task,
                    "args": step.args,
                }
            )
            self.stats.tasks_dispatched += 1
        faults.crash_point("supervisor.after_dispatch")

    def _on_outcome(self, worker: WorkerHandle, msg: dict[str, Any]) -> None:
        faults.crash_point("supervisor.outcome_received")
        key: TryKey = (msg["run"], msg["attempt"], msg["step"], msg["try"])
        if worker.tries.pop(key, "missing") == "missing":
            return  # a try this worker no longer owns (timed out, say)
        if worker.exclusive:
            worker.exclusive = False
            self._suspects.discard(key[:3])
        run = self.runs.get(key[0])
        if run is not None and not run.reloading:
            now = self.clock()
            if msg.get("ok"):
                events = decide.on_task_result(
                    run.state, *key[1:], msg.get("result"), now
                )
            else:
                error = decode_error(msg.get("error"))
                events = decide.on_task_failure(run.state, *key[1:], error, now)
            self._record(run, events)
        self._pump()

    def _on_worker_message(self, worker: WorkerHandle, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "outcome":
            self._on_outcome(worker, msg)
        elif op == "commands":
            self._on_commands(worker, msg)
        elif op == "diverged":
            self._on_diverged(worker, msg)
        elif op == "resync":
            self._on_resync(worker, msg)
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

        Who pays: a try we killed for running past its timeout fails with
        `TaskTimeout`; the others we killed with it were innocent and are
        interrupted for free. A worker that died on its own (a crash, running
        out of memory, a hung loop) charges every try it ran against that
        task's lost-worker budget; when it ran several, each becomes a suspect
        and runs alone next time, so that the next crash names the culprit.
        """
        self.stats.workers_lost += 1
        now = self.clock()
        tries = list(worker.tries)
        worker.tries.clear()
        touched: dict[str, LiveRun] = {}
        batch: list[Event] = []
        for key in tries:
            run_id, attempt, step_no, try_number = key
            run = self.runs.get(run_id)
            if run is None:
                continue
            step = run.state.steps.get((attempt, step_no))
            task = step.task if step else "?"
            if worker.killed_for == key:
                error = ErrorInfo.from_exception(TaskTimeout(worker.lost_reason))
            elif worker.killed_for is not None:
                error = ErrorInfo.from_exception(
                    Interrupted(
                        f"worker {worker.name} was replaced: {worker.lost_reason}"
                    )
                )
            else:
                error = decide.lost_worker_error(task, worker.lost_reason)
                if len(tries) > 1:
                    self._suspects.add(key[:3])
            events = decide.on_task_failure(
                run.state, attempt, step_no, try_number, error, now
            )
            run.history += events
            run.outbox += [e for e in events if _feeds(e)]
            batch += events
            touched[run_id] = run
        durable = self._write(batch, list(touched.values()))
        for run_id in list(worker.hosted):
            run = self.runs.get(run_id)
            if run is not None and run.host is worker:
                run.host = None
                run.activating = False
                touched[run_id] = run
        worker.hosted.clear()
        if not await durable:
            return  # the runs were reloaded from the journal
        for run in touched.values():
            if run.run_id in self.runs:
                self._after_change(run, None)
        # Runs that wait for any worker to host them.
        for run in list(self.runs.values()):
            if run.host is None and run.state.status is RunStatus.RUNNING:
                self._activate(run)

    async def _watch_timeouts(self) -> None:
        """Kill workers that hang: a try past its timeout, or no heartbeat.

        A plain-def task stuck in a loop shows as a try past its timeout; an
        `async def` task that blocks the worker's event loop also stops the
        worker answering pings.
        """
        last_ping = 0.0
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(0.1)
            now = self.clock()
            mono = time.monotonic()
            stalled = mono - last_tick - 0.1
            last_tick = mono
            if stalled > 1.0:
                # The supervisor itself was not running (SIGSTOP, a paused VM):
                # the workers' answers wait unread, so nobody is late but us.
                logger.warning(
                    "supervisor stalled for %.1fs; extending heartbeats and timeouts",
                    stalled,
                )
                for worker in self.pool.workers:
                    worker.last_pong = mono
                    for key, deadline in worker.tries.items():
                        if deadline is not None:
                            worker.tries[key] = deadline + stalled
                continue
            ping = mono - last_ping >= self.heartbeat_interval
            if ping:
                last_ping = mono
            for worker in list(self.pool.workers):
                if not worker.alive or worker.killed_for is not None:
                    continue
                late = [
                    k
                    for k, deadline in worker.tries.items()
                    if deadline and deadline < now
                ]
                if late:
                    self._kill_for_timeout(worker, late[0])
                elif mono - worker.last_pong > self.heartbeat_timeout:
                    logger.warning(
                        "worker %s answered no heartbeat for %.1fs; killing it",
                        worker.name,
                        mono - worker.last_pong,
                    )
                    self.pool.kill(
                        worker,
                        f"unresponsive: no heartbeat for {self.heartbeat_timeout:.0f}s",
                    )
                elif ping:
                    worker.conn.send({"op": "ping"})

    def _kill_for_timeout(self, worker: WorkerHandle, key: TryKey) -> None:
        run_id, attempt, step_no, _ = key
        run = self.runs.get(run_id)
        step = run.state.steps.get((attempt, step_no)) if run else None
        task = step.task if step else "?"
        timeout = (step.timeout if step else None) or self.default_task_timeout
        logger.warning(
            "task %s of run %s ran past its timeout of %ss; replacing worker %s",
            task,
            run_id,
            timeout,
            worker.name,
        )
        self.pool.kill(
            worker, f"task {task} ran past its timeout of {timeout}s", culprit=key
        )

    # What clients ask for.

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
            self._forget_unrecorded(run_id)
            why = f" ({self.journal_error})" if self.journal_error else ""
            raise JournalError(
                f"run {run_id} could not be recorded, so it was not submitted; "
                f"submit it again{why}"
            )
        self.stats.submitted += 1

    def _forget_unrecorded(self, run_id: str) -> None:
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

        None when the run is not live here (finished long ago, or unknown):
        the journal has its summary.
        """
        run = self.runs.get(run_id)
        if run is None:
            return None
        waiter: asyncio.Future[RunSummary] = asyncio.get_running_loop().create_future()
        if run.state.status is RunStatus.PARKED and run.settled:
            waiter.set_result(summarize(run.state))
        else:
            self._waiters.setdefault(run_id, []).append(waiter)
        return waiter

    async def wait(self, run_id: str) -> RunSummary | None:
        """Wait until the run is finished or parked; its summary then.

        None when the run is not live here (finished long ago, or unknown):
        the journal has its summary.
        """
        waiter = self.waiter(run_id)
        return None if waiter is None else await waiter

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
            recorded = self._record(run, events)
        finally:
            del self._submitting[run_id]
            done.set_result(None)
        return await recorded

    def live_runs(self) -> Iterable[LiveRun]:
        return self.runs.values()
