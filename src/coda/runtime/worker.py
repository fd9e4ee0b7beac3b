"""A worker process: runs tasks and hosts workflow instances for the supervisor.

Started by the supervisor as `python -m coda.runtime.worker --fd N --app APP`,
with one end of a socketpair inherited as file descriptor N. The worker talks
to nothing else: it never opens the journal and decides nothing. It

* runs each task try it is sent (`async def` tasks on its event loop, plain
  `def` tasks on threads of its own, see `_TryThreads`) and answers with the
  outcome;
* keeps a workflow instance per hosted run between activations, so that an
  activation costs only the new events; when it is sent a full history instead
  (the run's previous host died), it replays it from the start.

Anything a task raises, `SystemExit`, `KeyboardInterrupt` and
`asyncio.CancelledError` included, is reported as that try's failure; the
worker carries on. When the supervisor's end of the socket closes the worker
exits: a worker without its supervisor has nobody to report to.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import faulthandler
import functools
import logging
import math
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from coda.definitions import Registry, load_app
from coda.errors import (
    AppImportError,
    CodaError,
    NondeterminismError,
    ProtocolError,
    UnknownNameError,
)
from coda.journal import codec
from coda.journal.events import ErrorInfo
from coda.protocol import RAW, Connection, HandshakeRefused, client_handshake
from coda.replay.engine import CompleteRun, WorkflowInstance
from coda.runtime import faults
from coda.runtime.heap import settle_heap
from coda.runtime.wire import (
    WORKER_LINK_MAX_FRAME_BYTES,
    encode_commands,
    encode_error,
    raw_value,
)
from coda.values import check_value

__all__ = ["Worker", "main"]

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, conn: Connection, registry: Registry, name: str, threads: int):
        self.conn = conn
        self.registry = registry
        self.name = name
        self.instances: dict[str, WorkflowInstance] = {}
        self.threads = _TryThreads(threads, f"coda-{name}", self._thread_finished)
        # Strong references to `async def` tries, which asyncio does not keep.
        self.running: set[asyncio.Task[None]] = set()
        # The unfinished tries of each run, to cancel when the run ends:
        # asyncio tasks for `async def` tasks, `_ThreadTry` for plain `def` ones.
        self.by_run: dict[str, set[asyncio.Task[None] | _ThreadTry]] = {}

    async def serve(self) -> None:
        """Handle the supervisor's messages until it says stop or goes away."""
        self.threads.loop = asyncio.get_running_loop()
        # Each message is handled as soon as it arrives, in the callback that
        # receives it (see `Connection.serve`).
        await self.conn.serve(self.on_message)

    def on_message(self, msg: dict[str, Any]) -> None:
        """Handle one message, in the callback that received it. What this
        raises ends `serve`, and so the worker, as a bug of ours."""
        op = msg["op"]
        if op == "task":
            self._start_try(msg)
        elif op == "cancel":
            # The run ended (cancelled, or done without awaiting this task),
            # or, with "try", the supervisor no longer counts that one try.
            # TODO: a plain-def task keeps running in its thread: Python
            # cannot stop a thread, so its side effects still happen, and
            # the worker carries an extra thread (its slot goes to a new
            # one, see `_TryThreads.abandon`) until the function returns.
            self._cancel(msg["run"], msg.get("try"))
        elif op == "activate":
            # Answers to the activations before this one leave first: should
            # this one's code end the process or block the loop, they would
            # never leave, and the supervisor could not tell the activation
            # that was running (the first unanswered, see
            # `Activations.host_lost`) from those it had answered.
            self.conn.flush()
            self._activate(msg)
        elif op == "drop":
            self.instances.pop(msg["run"], None)
        elif op == "ping":
            self.conn.send({"op": "pong"})
        elif op == "stop":
            self.conn.stop_serving()
        else:
            logger.warning("worker %s ignores unknown message %r", self.name, op)

    def _cancel(self, run_id: str, only: list[int] | None) -> None:
        """Cancel the run's tries here, or only the one keyed [attempt, step, try]."""
        tries = self.by_run.get(run_id, set())
        for running in list(tries):
            if only is not None and _key_of(running) != tuple(only):
                continue
            tries.discard(running)
            if isinstance(running, _ThreadTry):
                self._cancel_thread_try(running)
            else:
                running.cancel()
        if not tries:
            self.by_run.pop(run_id, None)

    def _forget(self, run_id: str, running: asyncio.Task[None] | _ThreadTry) -> None:
        tries = self.by_run.get(run_id)
        if tries is not None:
            tries.discard(running)
            if not tries:
                del self.by_run[run_id]

    # Workflow code.

    def _activate(self, msg: dict[str, Any]) -> None:
        run_id = msg["run"]
        # Every answer names the activation it answers: one to an earlier
        # activation is stale by the time it arrives, and the supervisor
        # drops it (see `Activations._answering`).
        answer: dict[str, Any] = {"run": run_id, "n": msg.get("n")}
        faults.crash_point("worker.activation")
        instance = self.instances.get(run_id)
        if instance is None and not msg.get("full"):
            # New events for an instance this worker does not hold (dropped
            # after an error, say): only the whole history can rebuild it.
            self.conn.send({"op": "resync", **answer})
            return
        try:
            events = [codec.decode_dict(e) for e in msg["events"]]
            if msg.get("full") or instance is None:
                workflow = self.registry.workflow(msg["workflow"])
                instance = WorkflowInstance(workflow, run_id, msg["args"])
                self.instances[run_id] = instance
            commands = instance.activate(events)
        except (NondeterminismError, UnknownNameError) as exc:
            self.instances.pop(run_id, None)
            text = "".join(traceback.format_exception(exc))
            error = encode_error(ErrorInfo.from_exception(exc, text))
            self.conn.send({"op": "diverged", **answer, "error": error})
            return
        except CodaError as exc:
            # A history this worker cannot read (a newer event format, say) is
            # no reason to die: the run is parked with the reason.
            self.instances.pop(run_id, None)
            error = encode_error(ErrorInfo.from_exception(exc, traceback.format_exc()))
            self.conn.send({"op": "diverged", **answer, "error": error})
            return
        encoded, raw = encode_commands(commands)
        reply = {"op": "commands", **answer, "commands": encoded, RAW: raw}
        if instance.finished or any(type(c) is CompleteRun for c in commands):
            # The run ended, or its code returned: nothing more to feed the
            # instance (should the completion not be recorded, the supervisor
            # hosts the run afresh from its history). Saying so spares the
            # supervisor telling this worker to drop it. An attempt that
            # failed keeps its instance: the next attempt may follow.
            self.instances.pop(run_id, None)
            reply["finished"] = True
        self.conn.send(reply)
        faults.crash_point("worker.commands_sent")

    # Tasks.

    def _start_try(self, msg: dict[str, Any]) -> None:
        definition = self.registry.tasks.get(msg["task"])
        if definition is not None and not definition.is_async:
            # Straight to a thread, in this turn of the loop: no asyncio task
            # to wrap the try and no turn to wait for it to start.
            faults.crash_point("worker.task_received")
            job = _ThreadTry(msg, definition.fn)
            self.by_run.setdefault(msg["run"], set()).add(job)
            self.threads.submit(job)
            return
        # An `async def` task, or an unknown name (its failure is the outcome).
        key = (msg["attempt"], msg["step"], msg["try"])
        task = asyncio.create_task(self._run_task(msg), name=_TASK_NAME.format(*key))
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        self.by_run.setdefault(msg["run"], set()).add(task)
        task.add_done_callback(functools.partial(self._forget, msg["run"]))

    async def _run_task(self, msg: dict[str, Any]) -> None:
        faults.crash_point("worker.task_received")
        name = msg["task"]
        try:
            definition = self.registry.task(name)
            result = await definition.fn(**msg["args"])
        except BaseException as exc:  # every failure of a task is its outcome
            reply = _failure(msg, exc)
        else:
            reply = _success(msg, result)
        self._send_outcome(reply)

    def _thread_finished(self, job: _ThreadTry, reply: dict[str, Any]) -> None:
        """On the loop: a thread has run `job` and made its outcome `reply`."""
        if job.cancelled:
            return  # its run ended, and the try was answered as cancelled then
        job.finished = True
        self._forget(job.msg["run"], job)
        self._send_outcome(reply)

    def _cancel_thread_try(self, job: _ThreadTry) -> None:
        # As for an `async def` try, whose coroutine gets the CancelledError:
        # the try fails with it now. One that has not started never will; one
        # that runs is left to finish, and what it returns is dropped.
        if job.finished:
            return
        job.cancelled = True
        self.threads.abandon(job)
        self._send_outcome(_failure(job.msg, asyncio.CancelledError()))

    def _send_outcome(self, reply: dict[str, Any]) -> None:
        faults.crash_point("worker.task_returned")
        if self.conn.closed:
            # The worker is stopping and this try was cut short: nobody to tell,
            # and the supervisor records the try as interrupted.
            return
        self.conn.send(reply)
        faults.crash_point("worker.outcome_sent")


# An `async def` try's asyncio task is named after its key, which is how a
# cancel of one try finds it.
_TASK_NAME = "coda try {} {} {}"


def _key_of(running: asyncio.Task[None] | _ThreadTry) -> tuple[int, int, int]:
    """(attempt, step, try) of a running try."""
    if isinstance(running, _ThreadTry):
        msg = running.msg
        return (msg["attempt"], msg["step"], msg["try"])
    attempt, step, number = running.get_name().split()[2:]
    return (int(attempt), int(step), int(number))


class _ThreadTry:
    """A try of a plain `def` task, handed to a thread of `_TryThreads`."""

    __slots__ = ("cancelled", "finished", "fn", "msg", "queued_at", "thread")

    def __init__(self, msg: dict[str, Any], fn: Callable[..., Any]) -> None:
        self.msg = msg
        self.fn = fn
        # Both are set on the loop only; a thread reads `cancelled` to skip a
        # try whose run ended before it started.
        self.cancelled = False
        self.finished = False
        # The thread the try was handed to, until it has run it (under the
        # lock of `_TryThreads`).
        self.thread: _TryThread | None = None
        self.queued_at = 0.0  # time.monotonic() when it was queued

    def run(self) -> dict[str, Any]:
        """Run the try (in a thread) and make its outcome message."""
        msg = self.msg
        try:
            result = self.fn(**msg["args"])
        except BaseException as exc:  # every failure of a task is its outcome
            return _failure(msg, exc)
        return _success(msg, result)


class _TryThread:
    """One thread of `_TryThreads`: where it is handed tries, and whether its
    slot was taken away from it."""

    __slots__ = ("abandoned", "handoff")

    def __init__(self) -> None:
        self.handoff: queue.SimpleQueue[_ThreadTry | None] = queue.SimpleQueue()
        self.abandoned = False


# How long a try may wait for a running thread to take it before a sleeping
# one is woken for it, by the loop (`_unstick`); and at most, however busy the
# loop, by a thread of its own (`_watch`).
DEFER_S = 0.001
WATCH_S = 0.005


class _TryThreads:
    """Long-lived threads that run plain-def tries, one try a thread at a time.

    `run_in_executor` costs more than a no-op task itself: a concurrent future,
    an asyncio future chained to it, a callback to copy one into the other, and
    a turn of the loop to resume the coroutine awaiting it. Here a try is
    handed to an idle thread, which runs it, makes its outcome message (the
    result checked, the error described) and hands it to the loop; one call
    into the loop delivers every outcome finished meanwhile.

    There are `size` slots, and a thread for each is started before the
    worker takes work (`start_all`): started while tries arrive, each start
    waited for the new thread to get hold of the GIL from a busy event loop,
    a fifth of a worker's time in the first seconds of a burst. Threads live
    on, waiting for the next try.

    Tries queue, and a thread that finishes one takes the next before it
    sleeps; a sleeping thread is woken only for a try that no running thread
    will take (`submit`). Woken for every try, up to 64 threads took turns at
    the GIL with the loop and each other: under W1 of the benchmarks a
    worker switched threads 6 times a run, a fifth of its CPU in the
    kernel's scheduler; queued, 4 times, and the workers spent 5-15 % less
    CPU a run. A try queued behind a long one gets a thread of its own
    DEFER_S later (`_unstick`, on the loop), or WATCH_S later if the loop is
    held up (`_watch`, a thread). `coda run` gives a worker a slot for every
    try it may hold, so a try never waits longer than that for a thread
    while the supervisor's clock for its start-to-close timeout runs,
    provided no thread stays busy with a try the supervisor no longer counts:

    * a try that times out has its worker killed, threads and all;
    * a try whose run ended is answered as cancelled at once, but Python cannot
      stop its thread. That thread is abandoned: it gives its slot up (a new
      thread is started for the next try that needs one), and when its
      function returns, its outcome is dropped and it takes a free slot again,
      or ends if there is none. So there are at most `size` threads plus one
      for each abandoned try still running.
    """

    def __init__(
        self,
        size: int,
        prefix: str,
        finished: Callable[[_ThreadTry, dict[str, Any]], None],
    ) -> None:
        self.size = size
        self.prefix = prefix
        self.loop: asyncio.AbstractEventLoop | None = None
        self._finished = finished
        self._lock = threading.Lock()
        # All under the lock: threads holding a slot (not abandoned), those of
        # them waiting for a try, and tries queued, in order (for a running
        # thread to take, or for a free slot when the worker was sent more
        # tries than it has).
        self._slotted = 0
        self._idle: list[_TryThread] = []
        self._waiting: collections.deque[_ThreadTry] = collections.deque()
        self._numbered = 0
        self._closed = False
        self._done: collections.deque[tuple[_ThreadTry, dict[str, Any]]] = (
            collections.deque()
        )
        self._wakeup_pending = False
        self._unstick_timer: asyncio.TimerHandle | None = None
        # The thread that hands queued tries out when the loop cannot
        # (`_watch`), started with the first try queued; `_watching` while it
        # looks every WATCH_S, `_queued` to wake it (under the lock).
        self._watcher: threading.Thread | None = None
        self._watching = False
        self._queued = threading.Condition(self._lock)

    def start_all(self) -> None:
        """Start a thread for every free slot, to wait for tries."""
        runners = []
        with self._lock:
            while self._slotted < self.size and not self._closed:
                self._slotted += 1
                self._numbered += 1
                thread = _TryThread()
                self._idle.append(thread)
                runners.append(self._runner(thread))
        for runner in runners:
            runner.start()

    def submit(self, job: _ThreadTry) -> None:
        """Queue a try; it starts at once if no thread running will take it.

        A thread that finishes a try takes the next one queued before it
        sleeps (`_after_try`). So a try queued while more threads are running
        than tries are queued waits for one of them, sparing a sleeping
        thread's wake-up and a turn at the GIL shared with the running ones.
        Should none be done DEFER_S later (a long try), `_unstick` wakes a
        thread for it, so that a try never waits for a slower one's end; if
        the loop is held up, `_watch` does within WATCH_S.
        """
        start_watcher = False
        job.queued_at = time.monotonic()
        with self._lock:
            self._waiting.append(job)
            handed = self._hand_out(self._slotted - len(self._idle))
            if self._waiting:
                if self._unstick_timer is None:
                    assert self.loop is not None
                    self._unstick_timer = self.loop.call_later(DEFER_S, self._unstick)
                if not self._watching:
                    self._watching = True
                    start_watcher = self._watcher is None
                    self._queued.notify()
        self._start(handed)
        if start_watcher:
            self._watcher = threading.Thread(
                target=self._watch, name=f"{self.prefix}-watcher", daemon=True
            )
            self._watcher.start()

    def _unstick(self) -> None:
        """On the loop: hand every try still queued to an idle or new thread."""
        self._unstick_timer = None
        with self._lock:
            handed = self._hand_out(0)
        self._start(handed)

    def _watch(self) -> None:
        """A thread: hand queued tries out every WATCH_S while any are queued.

        `_unstick` runs on the loop, which an `async def` task that blocks, or
        long workflow code, can hold for seconds, while the supervisor's
        clock for the queued tries' timeouts runs. This thread does not
        depend on the loop; it sleeps for good while nothing is queued, so
        it costs a wake-up only every WATCH_S under load.
        """
        with self._lock:
            while not self._closed:
                if not self._waiting:
                    self._watching = False
                    self._queued.wait()
                    continue
                self._queued.wait(WATCH_S)
                # Only tries the loop did not get to: the others are about to
                # be taken, by a running thread or by `_unstick`. Started
                # under the lock: a new thread takes no lock before it waits
                # for its try, so this holds the others up only for as long
                # as the hand-over.
                stale = time.monotonic() - WATCH_S
                self._start(self._hand_out(0, queued_before=stale))

    def _hand_out(
        self, running: int, queued_before: float = math.inf
    ) -> list[tuple[_TryThread, _ThreadTry, threading.Thread | None]]:
        """Under the lock: the oldest queued tries beyond what `running` threads
        will take (and queued before `queued_before`), each given an idle
        thread or a new one (while slots last)."""
        handed = []
        waiting = self._waiting
        while len(waiting) > running and not self._closed:
            if waiting[0].queued_at > queued_before:
                break
            if self._idle:
                thread, runner = self._idle.pop(), None
                job = waiting.popleft()
                job.thread = thread
            elif self._slotted < self.size:
                job = waiting.popleft()
                thread, runner = self._slot_new(job)
            else:
                break
            handed.append((thread, job, runner))
            running += 1
        return handed

    @staticmethod
    def _start(
        handed: list[tuple[_TryThread, _ThreadTry, threading.Thread | None]],
    ) -> None:
        for thread, job, runner in handed:
            if runner is not None:
                runner.start()
            thread.handoff.put(job)

    def abandon(self, job: _ThreadTry) -> None:
        """On the loop: `job` was cancelled. Its thread, if it is running it,
        gives up its slot, and a try waiting for one gets a new thread."""
        with self._lock:
            thread = job.thread
            if thread is None:
                # Waiting for a slot, or already run: either way no thread is
                # held up by it.
                with contextlib.suppress(ValueError):
                    self._waiting.remove(job)
                return
            if thread.abandoned:
                return
            thread.abandoned = True
            self._slotted -= 1
            if not self._waiting or self._closed:
                return
            next_job = self._waiting.popleft()
            replacement, runner = self._slot_new(next_job)
        runner.start()
        replacement.handoff.put(next_job)

    def shutdown(self) -> None:
        """Drop the tries not started; threads stop once their try returns."""
        with self._lock:
            self._closed = True
            for job in self._waiting:
                job.cancelled = True
            self._waiting.clear()
            idle, self._idle = self._idle, []
            self._queued.notify_all()  # the watcher ends
        for thread in idle:
            thread.handoff.put(None)

    def _slot_new(self, job: _ThreadTry) -> tuple[_TryThread, threading.Thread]:
        """Under the lock: take a free slot for a new thread, to be handed `job`;
        the caller starts it once the lock is released."""
        self._slotted += 1
        self._numbered += 1
        thread = _TryThread()
        job.thread = thread
        return thread, self._runner(thread)

    def _runner(self, thread: _TryThread) -> threading.Thread:
        return threading.Thread(
            target=self._serve,
            args=(thread,),
            name=f"{self.prefix}_{self._numbered}",
            daemon=True,
        )

    def _serve(self, me: _TryThread) -> None:
        job = me.handoff.get()
        while job is not None:
            reply = None
            if not job.cancelled:
                try:
                    reply = job.run()
                except Exception as exc:
                    # Describing the outcome failed (an exception whose str()
                    # raises, say): that is the try's failure, and the thread
                    # must live on to run the next one.
                    reply = _failure(job.msg, exc)
            # The next try is found (or the thread goes idle) before this
            # outcome is out, so that a try sent in answer finds this thread.
            stay, next_job = self._after_try(me, job)
            if reply is not None:
                self._post(job, reply)
            if not stay:
                return
            job = next_job if next_job is not None else me.handoff.get()

    def _after_try(
        self, me: _TryThread, job: _ThreadTry
    ) -> tuple[bool, _ThreadTry | None]:
        """`me` has run `job`: whether it stays, and the try it takes next (None:
        it waits to be handed one)."""
        with self._lock:
            job.thread = None
            if me.abandoned:
                if self._slotted >= self.size or self._closed:
                    return False, None  # its slot went to another thread
                me.abandoned = False
                self._slotted += 1
            if self._waiting:
                next_job = self._waiting.popleft()
                next_job.thread = me
                return True, next_job
            if self._closed:
                self._slotted -= 1
                return False, None
            self._idle.append(me)
            return True, None

    def _post(self, job: _ThreadTry, reply: dict[str, Any]) -> None:
        # The loop clears the flag before it takes outcomes, so an outcome
        # added after the flag was seen set is taken by the wake-up pending.
        self._done.append((job, reply))
        if self._wakeup_pending:
            return
        self._wakeup_pending = True
        assert self.loop is not None
        # A closed loop: the worker is stopping, and there is nobody to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self._wakeup_pending = False
        done = self._done
        while done:
            job, reply = done.popleft()
            try:
                self._finished(job, reply)
            except Exception:
                # One outcome that cannot be sent must not hold up the others.
                logger.exception("outcome of task %s not sent", job.msg["task"])


def _reply(msg: dict[str, Any]) -> dict[str, Any]:
    return {
        "op": "outcome",
        "run": msg["run"],
        "attempt": msg["attempt"],
        "step": msg["step"],
        "try": msg["try"],
    }


def _success(msg: dict[str, Any], result: Any) -> dict[str, Any]:
    # None, True and False are JSON and far under any value limit; the check
    # is for everything else.
    reply = _reply(msg)
    if result is not None and result is not True and result is not False:
        try:
            encoded = check_value(result, f"result of task {msg['task']}")
        except CodaError as exc:
            reply.update(ok=False, error=encode_error(ErrorInfo.from_exception(exc)))
            return reply
        # Sent as it is encoded: the supervisor passes it on, never reading it.
        reply.update(ok=True, **{RAW: raw_value(["result"], encoded)})
        return reply
    reply.update(ok=True, result=result)
    return reply


def _failure(msg: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    text = "".join(traceback.format_exception(exc))
    reply = _reply(msg)
    reply.update(ok=False, error=encode_error(ErrorInfo.from_exception(exc, text)))
    return reply


async def _main(fd: int, app: str, name: str, threads: int) -> None:
    registry = load_app(app)
    sock = socket.socket(fileno=fd)
    conn = await Connection.from_socket(
        sock, name="supervisor", max_frame_bytes=WORKER_LINK_MAX_FRAME_BYTES
    )
    try:
        await client_handshake(conn, "worker", worker=name, pid=os.getpid())
    except ProtocolError as exc:
        if isinstance(exc, HandshakeRefused):
            raise
        # The supervisor went away while we started (or says nonsense, which it
        # logs on its side): nobody to work for, nothing to add.
        return
    worker = Worker(conn, registry, name, threads)
    worker.threads.start_all()
    settle_heap()  # the app imported and connected: what lives now stays
    try:
        await worker.serve()
    except (ProtocolError, ConnectionError):
        pass  # the supervisor died mid-message: nobody left to answer
    finally:
        await conn.close()
        # Threads running plain-def tasks cannot be interrupted; the supervisor
        # has recorded their tries as interrupted, so leave without them.
        worker.threads.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="coda-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--app", required=True)
    parser.add_argument("--name", default="worker")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s {args.name} %(levelname)s %(message)s",
    )
    faulthandler.enable()
    sys.path.insert(0, os.getcwd())
    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(_main(args.fd, args.app, args.name, args.threads))
        except AppImportError as exc:
            # The message is the app's traceback: no need for Coda's around it.
            logging.getLogger(__name__).error("%s", exc)
            sys.stderr.flush()
            os._exit(1)
    # Skip interpreter teardown: stuck task threads would otherwise hold us here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
