"""The supervisor's worker processes: starting them, talking to them, losing them.

Each worker is a child process holding one end of a socketpair, inherited as a
file descriptor: no listening port, nothing another process could connect to.
The supervisor learns of a worker's death at once, because its end of the socket
reaches end-of-file; it then reaps the process and asks the supervisor (through
`on_lost`) to reschedule the worker's tries and re-host its runs, and starts a
replacement. A worker that keeps dying right after it starts is restarted with a
growing delay rather than in a hot loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from coda.errors import ProtocolError
from coda.protocol import Connection, server_handshake
from coda.runtime.wire import WORKER_LINK_MAX_FRAME_BYTES

__all__ = ["WorkerHandle", "WorkerPool"]

logger = logging.getLogger(__name__)

# A try as the pool knows it: (run, attempt, step, try).
TryKey = tuple[str, int, int, int]


@attrs.define(eq=False)
class WorkerHandle:
    name: str
    process: asyncio.subprocess.Process
    conn: Connection
    started_at: float
    # Tries sent to this worker and not answered yet, with their deadline.
    tries: dict[TryKey, float | None] = attrs.field(factory=dict)
    # Tries started for this worker that it has no room for yet, oldest
    # first, with the time their start became durable (None until then):
    # each is sent the moment one of `tries` ends (see `Dispatcher.pump`).
    on_deck: dict[TryKey, float | None] = attrs.field(factory=dict)
    hosted: set[str] = attrs.field(factory=set)
    alive: bool = True
    lost_reason: str = ""
    # The try we killed this worker for (past its timeout), if we did.
    killed_for: TryKey | None = None
    # Running a suspect try alone: no other try is sent here meanwhile.
    exclusive: bool = False
    last_pong: float = attrs.field(factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid


class WorkerPool:
    def __init__(
        self,
        app: str,
        size: int,
        *,
        on_message: Callable[[WorkerHandle, dict[str, Any]], None],
        on_lost: Callable[[WorkerHandle], Awaitable[None]],
        on_ready: Callable[[WorkerHandle], None] | None = None,
        threads: int = 16,
        log_level: str = "WARNING",
        env: dict[str, str] | None = None,
    ) -> None:
        self.app = app
        self.size = size
        self.on_message = on_message
        self.on_lost = on_lost
        self.on_ready = on_ready
        self.threads = threads
        self.log_level = log_level
        self.env = env
        self.workers: list[WorkerHandle] = []
        self._serial = 0
        self._quick_deaths = 0
        self._last_loss = ""
        self._closing = False
        self._readers: set[asyncio.Task[None]] = set()
        # Replacements being started, so that `close` can stop them too.
        self._respawns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn() for _ in range(self.size)))

    async def _spawn(self) -> None:
        self._serial += 1
        name = f"w{self._serial}"
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "coda.runtime.worker",
                "--fd",
                str(theirs.fileno()),
                "--app",
                self.app,
                "--name",
                name,
                "--threads",
                str(self.threads),
                "--log-level",
                self.log_level,
                pass_fds=(theirs.fileno(),),
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        conn = await Connection.from_socket(
            ours,
            name=f"worker {name}",
            max_frame_bytes=WORKER_LINK_MAX_FRAME_BYTES,
            raw=True,
        )
        try:
            await server_handshake(conn)
        except ProtocolError as exc:
            await conn.close()
            code = await self._reap(process)
            # Most often the app failed to import in the worker (its traceback
            # went to stderr): a quick death like any other, or the next worker
            # would be started at once, and fail the same way, in a hot loop.
            self._quick_deaths += 1
            self._last_loss = f"{_describe_exit(code)} before its handshake"
            logger.warning(
                "worker %s (pid %d) lost: %s (%s)",
                name,
                process.pid,
                self._last_loss,
                exc,
            )
            self._schedule_respawn()
            return
        handle = WorkerHandle(name, process, conn, time.monotonic())
        self.workers.append(handle)
        logger.info("worker %s started (pid %d)", name, process.pid)
        reader = asyncio.create_task(self._read(handle))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        if self.on_ready is not None:
            self.on_ready(handle)

    async def _read(self, handle: WorkerHandle) -> None:
        try:
            # Each message is handled as soon as it arrives, in the callback
            # that receives it (see `Connection.serve`).
            await handle.conn.serve(functools.partial(self._handle, handle))
        except ProtocolError as exc:
            handle.lost_reason = f"protocol error: {exc}"
        except OSError as exc:
            # Not the worker going away (`recv` takes a reset for the end of
            # the stream) but the link itself failing: the worker is lost all
            # the same, and its tries must run again elsewhere.
            handle.lost_reason = f"its connection failed: {exc}"
        await self._lose(handle)

    def _handle(self, handle: WorkerHandle, msg: dict[str, Any]) -> None:
        try:
            self.on_message(handle, msg)
        except Exception:
            # A bug of ours: dropping the worker would charge its tries for
            # it. Say so loudly and go on with the next message.
            logger.exception(
                "worker %s: the supervisor failed handling its %r message; "
                "this is a bug, please report it",
                handle.name,
                msg.get("op"),
            )

    async def _lose(self, handle: WorkerHandle) -> None:
        if not handle.alive:
            return
        handle.alive = False
        if handle in self.workers:
            self.workers.remove(handle)
        await handle.conn.close()
        code = await self._reap(handle.process)
        reason = handle.lost_reason or _describe_exit(code)
        handle.lost_reason = reason
        if self._closing:
            return
        logger.warning(
            "worker %s (pid %d) lost: %s; %d tries and %d runs to reschedule",
            handle.name,
            handle.pid,
            reason,
            len(handle.tries) + len(handle.on_deck),
            len(handle.hosted),
        )
        self._last_loss = reason
        # A worker that dies running tries was most likely killed by one of
        # them, which that task's budget of lost workers answers for: no
        # reason to wait before the next.
        if not handle.tries and time.monotonic() - handle.started_at < 2.0:
            self._quick_deaths += 1
        else:
            self._quick_deaths = 0
        await self.on_lost(handle)
        self._schedule_respawn()

    def _schedule_respawn(self) -> None:
        if self._closing:
            return
        delay = min(0.1 * 2**self._quick_deaths, 5.0) if self._quick_deaths else 0.0
        if self._quick_deaths >= 3:
            logger.error(
                "workers keep dying right after they start (the last: %s); next "
                "one in %.1fs. Check that the app imports cleanly and that no "
                "workflow code ends its process",
                self._last_loss,
                delay,
            )
        asyncio.get_running_loop().call_later(delay, self._start_respawn)

    def _start_respawn(self) -> None:
        if self._closing:
            return
        task = asyncio.ensure_future(self._respawn())
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn(self) -> None:
        if self._closing or len(self.workers) >= self.size:
            return
        try:
            await self._spawn()
        except OSError as exc:
            # Out of file descriptors or processes, say: keep trying, slowly,
            # rather than run on with fewer workers until restarted.
            self._quick_deaths += 1
            self._last_loss = f"could not start: {exc}"
            logger.error("cannot start a worker: %s; trying again", exc)
            self._schedule_respawn()

    def kill(
        self, handle: WorkerHandle, reason: str, culprit: TryKey | None = None
    ) -> None:
        """Kill a worker (hung, or `culprit` past its timeout); it is then lost."""
        handle.lost_reason = reason
        handle.killed_for = culprit
        with contextlib.suppress(ProcessLookupError):
            handle.process.send_signal(signal.SIGKILL)

    async def _reap(self, process: asyncio.subprocess.Process) -> int | None:
        try:
            return await asyncio.wait_for(process.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            return await process.wait()

    async def close(self, grace: float = 3.0) -> None:
        """Ask every worker to stop, and kill those that do not in time."""
        self._closing = True
        deadline = time.monotonic() + grace
        if self._respawns:
            # A replacement still starting is stopped with the others, not left
            # to find its supervisor gone in the middle of its hello.
            await asyncio.wait(self._respawns, timeout=grace)
        for handle in list(self.workers):
            with contextlib.suppress(Exception):
                handle.conn.send({"op": "stop"})
                await handle.conn.drain()
        for handle in list(self.workers):
            left = max(deadline - time.monotonic(), 0.05)
            try:
                await asyncio.wait_for(handle.process.wait(), left)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    handle.process.kill()
                await handle.process.wait()
            await handle.conn.close()
        for reader in list(self._readers):
            reader.cancel()
        self.workers.clear()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "its connection closed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
