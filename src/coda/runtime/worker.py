"""A worker process: runs tasks and hosts workflow instances for the supervisor.

Started by the supervisor as `python -m coda.runtime.worker --fd N --app APP`,
with one end of a socketpair inherited as file descriptor N. The worker talks
to nothing else: it never opens the journal and decides nothing. It

* runs each task try it is sent (`async def` tasks on its event loop, plain
  `def` tasks in a thread pool) and answers with the outcome;
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
import concurrent.futures
import contextlib
import faulthandler
import functools
import logging
import os
import socket
import sys
import traceback
from typing import Any

from coda.definitions import Registry, load_app
from coda.errors import CodaError, NondeterminismError, ProtocolError, UnknownNameError
from coda.journal import codec
from coda.journal.events import ErrorInfo
from coda.protocol import Connection, HandshakeRefused, client_handshake
from coda.replay.engine import WorkflowInstance
from coda.runtime import faults
from coda.runtime.wire import (
    WORKER_LINK_MAX_FRAME_BYTES,
    encode_command,
    encode_error,
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
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=f"coda-{name}"
        )
        self.running: set[asyncio.Task[None]] = set()
        self.by_run: dict[str, set[asyncio.Task[None]]] = {}

    async def serve(self) -> None:
        while True:
            msg = await self.conn.recv()
            if msg is None or msg["op"] == "stop":
                return
            op = msg["op"]
            if op == "task":
                task = asyncio.create_task(self._run_task(msg))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
                self.by_run.setdefault(msg["run"], set()).add(task)
                task.add_done_callback(functools.partial(self._forget, msg["run"]))
            elif op == "cancel":
                # The run ended (cancelled, or done without awaiting this task).
                # TODO: a plain-def task keeps running in its thread: Python
                # cannot stop a thread, so its side effects still happen and
                # the thread stays busy until the function returns.
                for task in self.by_run.pop(msg["run"], ()):
                    task.cancel()
            elif op == "activate":
                self._activate(msg)
            elif op == "drop":
                self.instances.pop(msg["run"], None)
            elif op == "ping":
                self.conn.send({"op": "pong"})
            else:
                logger.warning("worker %s ignores unknown message %r", self.name, op)

    def _forget(self, run_id: str, task: asyncio.Task[None]) -> None:
        tasks = self.by_run.get(run_id)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self.by_run[run_id]

    # Workflow code.

    def _activate(self, msg: dict[str, Any]) -> None:
        run_id = msg["run"]
        faults.crash_point("worker.activation")
        instance = self.instances.get(run_id)
        if instance is None and not msg.get("full"):
            # New events for an instance this worker does not hold (dropped
            # after an error, say): only the whole history can rebuild it.
            self.conn.send({"op": "resync", "run": run_id})
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
            self.conn.send({"op": "diverged", "run": run_id, "error": error})
            return
        except CodaError as exc:
            # A history this worker cannot read (a newer event format, say) is
            # no reason to die: the run is parked with the reason.
            self.instances.pop(run_id, None)
            error = encode_error(ErrorInfo.from_exception(exc, traceback.format_exc()))
            self.conn.send({"op": "diverged", "run": run_id, "error": error})
            return
        if instance.finished:
            self.instances.pop(run_id, None)
        self.conn.send(
            {
                "op": "commands",
                "run": run_id,
                "commands": [encode_command(c) for c in commands],
            }
        )
        faults.crash_point("worker.commands_sent")

    # Tasks.

    async def _run_task(self, msg: dict[str, Any]) -> None:
        reply = {
            "op": "outcome",
            "run": msg["run"],
            "attempt": msg["attempt"],
            "step": msg["step"],
            "try": msg["try"],
        }
        faults.crash_point("worker.task_received")
        ok, value = await self._call(msg["task"], msg["args"])
        faults.crash_point("worker.task_returned")
        if ok:
            try:
                check_value(value, f"result of task {msg['task']}")
            except CodaError as exc:
                ok, value = False, ErrorInfo.from_exception(exc)
        if ok:
            reply.update(ok=True, result=value)
        else:
            reply.update(ok=False, error=encode_error(value))
        if self.conn.closed:
            # The worker is stopping and this try was cut short: nobody to tell,
            # and the supervisor records the try as interrupted.
            return
        self.conn.send(reply)
        faults.crash_point("worker.outcome_sent")

    async def _call(self, name: str, args: dict[str, Any]) -> tuple[bool, Any]:
        try:
            definition = self.registry.task(name)
            if definition.is_async:
                result = await definition.fn(**args)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(
                    self.executor, _call_sync, definition.fn, args
                )
        except BaseException as exc:  # every failure of a task is its outcome
            text = "".join(traceback.format_exception(exc))
            return False, ErrorInfo.from_exception(exc, text)
        return True, result


def _call_sync(fn: Any, args: dict[str, Any]) -> Any:
    return fn(**args)


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
    try:
        await worker.serve()
    except (ProtocolError, ConnectionError):
        pass  # the supervisor died mid-message: nobody left to answer
    finally:
        await conn.close()
        # Threads running plain-def tasks cannot be interrupted; the supervisor
        # has recorded their tries as interrupted, so leave without them.
        worker.executor.shutdown(wait=False, cancel_futures=True)


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
        asyncio.run(_main(args.fd, args.app, args.name, args.threads))
    # Skip interpreter teardown: stuck task threads would otherwise hold us here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
