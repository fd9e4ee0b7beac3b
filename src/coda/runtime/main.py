"""`coda run`: a supervisor, its workers and its client socket, until a signal.

Kept apart from the supervisor so that the supervisor stays testable in-process
(start, drive, stop) while this edge deals with signals, paths and logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from coda.definitions import load_app
from coda.errors import CodaError
from coda.journal.sqlite import SQLiteJournal
from coda.runtime.client import default_socket_path
from coda.runtime.heap import settle_heap
from coda.runtime.server import ClientServer
from coda.runtime.supervisor import Supervisor

__all__ = ["serve"]

logger = logging.getLogger(__name__)


async def serve(
    app: str,
    *,
    journal_path: str,
    workers: int | None = None,
    socket_path: str | None = None,
    tcp: tuple[str, int] | None = None,
    token: str | None = None,
    synchronous: str = "FULL",
    concurrency: int = 64,
    ready_file: str | None = None,
    log_level: str = "WARNING",
    task_timeout: float | None = 300.0,
    heartbeat_interval: float = 1.0,
    heartbeat_timeout: float = 10.0,
) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly."""
    with _journal_lock(journal_path):
        registry = load_app(app)
        journal = await SQLiteJournal.open(journal_path, synchronous=synchronous)
        supervisor = Supervisor(
            journal,
            app,
            registry,
            workers=workers or os.cpu_count() or 2,
            # A thread for every try a worker may hold: a plain-def try never
            # waits in a queue while its start-to-close timeout runs.
            worker_threads=concurrency,
            max_tries_per_worker=concurrency,
            log_level=log_level,
            default_task_timeout=task_timeout,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
        )
        path = Path(socket_path) if socket_path else default_socket_path(journal_path)
        server = ClientServer(supervisor, socket_path=path, tcp=tcp, token=token)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            settle_heap()  # the app and Coda imported
            await supervisor.start()
            await server.start()
            settle_heap()  # and the unfinished runs recovered
            logger.warning(
                "coda: supervisor pid %d serving %s on %s%s with %d workers "
                "(%d unfinished runs recovered)",
                os.getpid(),
                journal_path,
                path,
                f" and tcp://{tcp[0]}:{server.tcp_port()}" if tcp else "",
                supervisor.pool.size,
                len(supervisor.runs),
            )
            if ready_file:
                Path(ready_file).write_text(str(os.getpid()))
            await stop.wait()
            logger.warning("coda: stopping")
        finally:
            # Each step even if one before it failed: an unclosed journal keeps
            # its threads, and the process would never exit.
            try:
                await server.close()
            finally:
                try:
                    await supervisor.stop()
                finally:
                    await journal.close()


@contextlib.contextmanager
def _journal_lock(journal_path: str) -> Iterator[None]:
    """Hold the journal's lock while serving it: one supervisor per journal.

    A second supervisor would recover the runs the first is running, record
    their tries as interrupted and run them again, and take over the first
    one's socket. The lock is an flock on a file beside the socket, which the
    kernel releases however its holder ends, SIGKILL included, so a crashed
    supervisor never keeps the next one out. Workers do not inherit it.
    """
    journal = Path(journal_path).absolute()
    path = journal.parent / ".coda" / f"{journal.name}.lock"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CodaError(
                f"another supervisor (pid {holder}) is serving {journal}; stop it "
                "before starting another, or talk to it with `coda submit` and "
                "friends"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
