"""The dispatch of tries: which worker runs which due step, and what came of it.

The supervisor queues a run's steps here as they become due (`queue`), each
once, and they start oldest run first (by submission time), a run's steps in
their order. So a burst of submissions is worked through run by run: the first
runs finish while the last are still waiting, rather than every run taking its
first step, then every run its second; results come sooner and in order, and
the example's store step, which its writers take in turn, runs all along
beside the other steps instead of all at the end.

`pump` starts as many as the workers have room for: it records a
`TaskStarted` for each, and all of them go to the journal in one append. A try
is sent to its worker only once its start is durable (the supervisor's
write-ahead rule), so a crash can lose a try the journal has started, which
then runs again, but never run one the journal does not know.

A worker runs up to `max_tries_per_worker` tries at once (each plain-def try
has a thread of its own there), and `pump` starts up to as many again for it,
which wait here "on deck" (`WorkerHandle.on_deck`) and are sent the moment one
of its tries ends. Without them, a slot would stand empty from an outcome
until the start of the next try was durable, a commit later (2 to 10 ms under
load, against tens of microseconds for the example's tasks). A try on deck
for longer than `ON_DECK_WAIT_S` (its worker busy with long tries) is
interrupted, at no cost to it, and starts again on another worker, if one has
room; else it keeps its place.

A try sent to a worker stays in the worker's `tries`, with its deadline (its
timeout counts from its sending), until its outcome arrives; that is all the
bookkeeping of tries in flight, and the slots a worker has free. An outcome
becomes the step's result or failure
(`coda.decide`), recorded like any other decision. An outcome of a run being
reread from the journal after a failed append is dropped: once reread, the
run's tries that the journal has started and no worker holds run again
(`reconcile_tries`).

A worker that dies ends its tries: who pays for them is said in
`reschedule_lost`. A step whose try died with others on one worker is a
suspect, and its next try runs alone, so that a task that kills its worker is
found out; under load, a worker is let run dry for it (`_draining`). A
watchdog kills workers that hang: a try past its timeout, or no answer to
heartbeats.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from coda import decide
from coda.errors import Interrupted, TaskTimeout
from coda.journal.events import ErrorInfo, Event
from coda.runtime import faults
from coda.runtime.pool import TryKey, WorkerHandle, WorkerPool
from coda.runtime.runs import LiveRun, Record, Stats, feeds
from coda.runtime.wire import decode_error
from coda.state import RunState, StepState, StepStatus

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)

# How long a try may wait on deck for its worker before it is moved to another.
ON_DECK_WAIT_S = 1.0

# A due step in the ready queue: (its run's submission time, run, attempt, step).
Ready = tuple[float, str, int, int]


def _is_due(state: RunState, step: StepState, now: float) -> bool:
    if step.attempt != state.attempt or state.status.finished:
        return False
    if step.status is StepStatus.SCHEDULED:
        return True
    return step.status is StepStatus.BACKOFF and (step.retry_at or 0.0) <= now


class Dispatcher:
    """The supervisor's ready queue and tries in flight.

    It shares the supervisor's runs, pool and counters, and records through
    the supervisor's `write` (events of several runs, then a step once they
    are durable) and `record` (one run's events, acted on once durable).
    """

    def __init__(
        self,
        runs: dict[str, LiveRun],
        pool: WorkerPool,
        stats: Stats,
        *,
        write: Callable[
            [list[Event], Iterable[LiveRun], Callable[[], None] | None],
            asyncio.Future[bool],
        ],
        record: Record,
        clock: Callable[[], float],
        max_tries_per_worker: int,
        default_task_timeout: float | None,
        heartbeat_interval: float,
        heartbeat_timeout: float,
    ) -> None:
        self.runs = runs
        self.pool = pool
        self.stats = stats
        self._write = write
        self._record = record
        self.clock = clock
        self.max_tries_per_worker = max_tries_per_worker
        self.default_task_timeout = default_task_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        # Steps waiting for a worker with room: a heap, oldest run first.
        self._ready: list[Ready] = []
        self._queued: set[tuple[str, int, int]] = set()
        # Steps whose last try died with others on one worker: they run alone.
        # TODO: suspects live only in memory: after a restart of the
        # supervisor their next tries run beside others again, and a task
        # that kills its worker charges innocent tries a second time. The
        # journal could rebuild them (WorkerLost failures of one worker).
        self._suspects: set[tuple[str, int, int]] = set()
        # The worker kept from new tries until it is idle, for a suspect that
        # is waiting (under load no worker would ever be idle otherwise).
        self._draining: WorkerHandle | None = None
        # Set once the supervisor stops: no try is started any more.
        self.stopping = False
        self._watchdog: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching the workers for tries past their timeout and silence."""
        self._watchdog = asyncio.create_task(self._watch_timeouts())

    def stop(self) -> None:
        """Start no more tries, and stop watching the workers."""
        self.stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()

    def queue(self, run: LiveRun, step: StepState) -> None:
        key = (run.run_id, step.attempt, step.step)
        if key not in self._queued:
            self._queued.add(key)
            heapq.heappush(self._ready, (run.state.submitted_at, *key))

    def pump(self) -> None:
        """Start due steps on workers with room: one commit, then send them.

        A suspect step (it was on a worker that died with other tries) runs
        alone on a worker, so that a task that kills its worker is found out
        and charged, and the tasks that merely shared the worker are not.
        """
        if self.stopping or not self._ready:
            return
        limit = self.max_tries_per_worker
        room = 2 * limit  # running, and as many on deck
        draining = self._drain_target()
        # Made once: within this call a worker only fills up or is reserved
        # (both by this loop, which then drops it). Most calls, one for each
        # outcome, find every worker full or start a single try.
        open_workers = [
            w
            for w in self.pool.workers
            if w.alive and not w.exclusive and w is not draining and _load(w) < room
        ]
        drained = draining is not None and not _load(draining)
        if not open_workers and not drained:
            return
        now = self.clock()
        starts: list[tuple[WorkerHandle, TryKey]] = []
        runs: dict[str, LiveRun] = {}
        events: list[Event] = []
        deferred: list[Ready] = []
        while self._ready and (open_workers or drained):
            entry = heapq.heappop(self._ready)
            key = entry[1:]
            run = self.runs.get(key[0])
            step = run.state.steps.get((key[1], key[2])) if run else None
            if (
                run is None
                or run.reloading  # scanned again once reread
                or step is None
                or not _is_due(run.state, step, now)
            ):
                self._queued.discard(key)
                self._suspects.discard(key)  # its run ended meanwhile, say
                continue
            if key in self._suspects:
                idle = [w for w in open_workers if not _load(w)]
                if drained and draining is not None:
                    idle.append(draining)
                if not idle:
                    if self._draining is None and open_workers:
                        # Let the least busy worker run dry for it.
                        self._draining = min(open_workers, key=_load)
                        open_workers.remove(self._draining)
                    deferred.append(entry)
                    continue
                worker = idle[0]
                worker.exclusive = True
                if worker is draining:
                    drained, self._draining = False, None
            elif not open_workers:
                deferred.append(entry)  # only a suspect could go to `draining`
                continue
            else:
                worker = min(open_workers, key=_load)
            self._queued.discard(key)
            started = decide.start_task(run.state, step, worker.name, now)
            run.history += started
            events += started
            started_try = (run.run_id, step.attempt, step.step, step.try_number)
            worker.on_deck[started_try] = None
            if (worker.exclusive or _load(worker) >= room) and worker in open_workers:
                open_workers.remove(worker)
            starts.append((worker, started_try))
            runs[run.run_id] = run
        for entry in deferred:
            heapq.heappush(self._ready, entry)
        if starts:
            durable = self._write(events, runs.values(), lambda: self._started(starts))
            durable.add_done_callback(lambda done: self._not_started(done, starts))

    def _drain_target(self) -> WorkerHandle | None:
        """The worker running dry for a suspect, while one waits for it."""
        draining = self._draining
        if draining is not None and (
            not draining.alive
            or draining.exclusive
            or not any(key in self._queued for key in self._suspects)
        ):
            draining = self._draining = None
        return draining

    def _started(self, starts: list[tuple[WorkerHandle, TryKey]]) -> None:
        """The starts of these tries are durable: send those their workers have
        room for; the others wait on deck."""
        now = self.clock()
        for worker, key in starts:
            if key in worker.on_deck:  # else lost, cancelled or reread meanwhile
                worker.on_deck[key] = now
        for worker in {id(worker): worker for worker, _ in starts}.values():
            self._send_on_deck(worker)
        faults.crash_point("supervisor.after_dispatch")

    def _not_started(
        self, durable: asyncio.Future[bool], starts: list[tuple[WorkerHandle, TryKey]]
    ) -> None:
        """If the starts could not be written, take their tries off the decks:
        they hold back the tries behind them, and their runs are reread."""
        if durable.cancelled() or not durable.result():
            for worker, key in starts:
                if worker.on_deck.get(key, 0) is None:
                    self._drop_on_deck(worker, key)

    def _send_on_deck(self, worker: WorkerHandle) -> None:
        """Send a worker the tries on deck for it, while it has room for them."""
        if self.stopping or not worker.alive:
            return
        deck, limit = worker.on_deck, self.max_tries_per_worker
        now = self.clock()
        while deck and len(worker.tries) < limit:
            key = next(iter(deck))
            if deck[key] is None:
                # Not durable yet, nor any started after it: tries start in
                # the order of their commits, which `_started` follows.
                return
            del deck[key]
            run = self.runs.get(key[0])
            step = run.state.steps.get(key[1:3]) if run is not None else None
            if (
                run is None
                or step is None
                or step.status is not StepStatus.STARTED
                or step.try_number != key[3]
            ):
                _release_if_idle(worker)  # its run ended meanwhile
                continue
            timeout = step.timeout or self.default_task_timeout
            worker.tries[key] = now + timeout if timeout else None
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

    def on_outcome(self, worker: WorkerHandle, msg: dict[str, Any]) -> None:
        faults.crash_point("supervisor.outcome_received")
        key: TryKey = (msg["run"], msg["attempt"], msg["step"], msg["try"])
        if worker.tries.pop(key, "missing") == "missing":
            return  # a try this worker no longer owns (timed out, say)
        if worker.exclusive:
            worker.exclusive = False
            self._suspects.discard(key[:3])
            # Idle now: the next suspect waiting takes it, not younger work.
            if self._drain_target() is None and any(
                suspect in self._queued for suspect in self._suspects
            ):
                self._draining = worker
        self._send_on_deck(worker)
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
        self.pump()

    def reschedule_lost(
        self, worker: WorkerHandle
    ) -> tuple[asyncio.Future[bool], dict[str, LiveRun]]:
        """Record the end of a dead worker's tries, so that they run again.

        Returns whether that is durable, and the runs it touched.

        Who pays: a try we killed for running past its timeout fails with
        `TaskTimeout`; the others we killed with it were innocent and are
        interrupted for free. A worker that died on its own (a crash, running
        out of memory, a hung loop) charges every try it ran against that
        task's lost-worker budget; when it ran several, each becomes a suspect
        and runs alone next time, so that the next crash names the culprit.
        Tries on deck for it never reached it: they are interrupted, for free.
        """
        now = self.clock()
        tries = list(worker.tries)
        worker.tries.clear()
        touched: dict[str, LiveRun] = {}
        batch: list[Event] = []

        def end(key: TryKey, error: ErrorInfo | None) -> None:
            """End a try with `error` (None: the worker died running it)."""
            run = self.runs.get(key[0])
            if run is None:
                return
            if error is None:
                step = run.state.steps.get(key[1:3])
                error = decide.lost_worker_error(
                    step.task if step else "?", worker.lost_reason
                )
            events = decide.on_task_failure(run.state, *key[1:], error, now)
            run.history += events
            run.outbox += [e for e in events if feeds(e)]
            batch.extend(events)
            touched[run.run_id] = run

        replaced = ErrorInfo.from_exception(
            Interrupted(f"worker {worker.name} was replaced: {worker.lost_reason}")
        )
        for key in tries:
            if worker.killed_for == key:
                end(key, ErrorInfo.from_exception(TaskTimeout(worker.lost_reason)))
            elif worker.killed_for is not None:
                end(key, replaced)
            else:
                if len(tries) > 1:
                    self._suspects.add(key[:3])
                end(key, None)
        never_sent = ErrorInfo.from_exception(
            Interrupted(f"worker {worker.name} was lost before the try was sent to it")
        )
        for key in list(worker.on_deck):
            end(key, never_sent)
        worker.on_deck.clear()
        return self._write(batch, list(touched.values()), None), touched

    def reconcile_tries(self, run_id: str, state: RunState | None) -> list[StepState]:
        """Keep the workers' tries of a run that its durable state knows running;
        return the steps that state has running with no worker holding them."""
        held: set[tuple[int, int, int]] = set()

        def running(key: TryKey) -> bool:
            step = state.steps.get(key[1:3]) if state is not None else None
            return (
                step is not None
                and step.status is StepStatus.STARTED
                and step.try_number == key[3]
            )

        for worker in self.pool.workers:
            for key in [k for k in worker.on_deck if k[0] == run_id]:
                if running(key):  # its start is durable, then
                    held.add(key[1:])
                    worker.on_deck[key] = worker.on_deck[key] or self.clock()
                else:
                    self._drop_on_deck(worker, key)
            for key in [k for k in worker.tries if k[0] == run_id]:
                if running(key):
                    held.add(key[1:])
                else:
                    # Its slot is counted free from now on: the worker must
                    # not keep a thread busy with it (nor report it).
                    self._forget_try(worker, key)
                    if worker.alive:
                        worker.conn.send(
                            {"op": "cancel", "run": run_id, "try": list(key[1:])}
                        )
        if state is None:
            return []
        return [
            step
            for step in state.steps.values()
            if step.status is StepStatus.STARTED
            and (step.attempt, step.step, step.try_number) not in held
        ]

    def rerun_orphans(self, run: LiveRun) -> None:
        """Once a run is reread, run again its tries that no worker holds."""
        orphans = self.reconcile_tries(run.run_id, run.state)
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

    def cancel_tries(self, run_id: str) -> None:
        """Forget every try of a run that ended, and cancel them on their workers."""
        for worker in self.pool.workers:
            for key in [key for key in worker.on_deck if key[0] == run_id]:
                self._drop_on_deck(worker, key)
            mine = [key for key in worker.tries if key[0] == run_id]
            if mine:
                for key in mine:
                    self._forget_try(worker, key)
                if worker.alive:
                    worker.conn.send({"op": "cancel", "run": run_id})
        if self._suspects:
            self._suspects = {key for key in self._suspects if key[0] != run_id}

    def _drop_on_deck(self, worker: WorkerHandle, key: TryKey) -> None:
        """Take a try off a worker's deck; a worker kept for a suspect that
        is left with nothing takes others again."""
        del worker.on_deck[key]
        _release_if_idle(worker)
        self._send_on_deck(worker)  # what it held back, if it was first

    def _forget_try(self, worker: WorkerHandle, key: TryKey) -> None:
        """Stop counting a try on its worker: its slot is free from now on.

        A worker running a suspect try alone takes others again: its outcome,
        should it still come, is dropped before it could free the worker.
        """
        del worker.tries[key]
        if worker.exclusive:
            worker.exclusive = False

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
                    for key, since in worker.on_deck.items():
                        if since is not None:
                            worker.on_deck[key] = since + stalled
                continue
            ping = mono - last_ping >= self.heartbeat_interval
            if ping:
                last_ping = mono
            for worker in list(self.pool.workers):
                if not worker.alive or worker.killed_for is not None:
                    continue
                self._move_waiting(worker, now)
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

    def _move_waiting(self, worker: WorkerHandle, now: float) -> None:
        """Interrupt the tries on deck for `worker` longer than `ON_DECK_WAIT_S`,
        so that they start again on a worker with room, if one has room.

        Without one, the try keeps its place: interrupted, it would only wait
        again, behind younger runs that took its place meanwhile.
        """
        limit, draining = self.max_tries_per_worker, self._drain_target()
        room = [
            w
            for w in self.pool.workers
            if w is not worker
            and w.alive
            and not w.exclusive
            and w is not draining
            and _load(w) < limit
        ]
        waited = [
            key
            for key, since in worker.on_deck.items()
            if since is not None and now - since > ON_DECK_WAIT_S
        ]
        for key in waited[: sum(limit - _load(w) for w in room)]:
            self._drop_on_deck(worker, key)
            run = self.runs.get(key[0])
            if run is None or run.reloading:
                continue
            error = ErrorInfo.from_exception(
                Interrupted(
                    f"worker {worker.name} had no room for the try for "
                    f"{ON_DECK_WAIT_S:g}s; it starts again where there is room"
                )
            )
            self._record(run, decide.on_task_failure(run.state, *key[1:], error, now))

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


def _load(worker: WorkerHandle) -> int:
    """Tries a worker runs or has on deck."""
    return len(worker.tries) + len(worker.on_deck)


def _release_if_idle(worker: WorkerHandle) -> None:
    """A worker kept for a suspect that is left with nothing takes others again."""
    if worker.exclusive and not _load(worker):
        worker.exclusive = False
