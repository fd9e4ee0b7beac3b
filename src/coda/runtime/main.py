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
import stat
import tempfile
from collections.abc import Callable, Iterator
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
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly.

    `announce` gets the lines that say the supervisor serves and stops, for
    the person at the terminal (`coda run` prints them whatever the log
    level); without it they are logged at info, as lifecycle is.
    """
    say = announce or logger.info
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
            tcp_part = f" and tcp://{tcp[0]}:{server.tcp_port()}" if tcp else ""
            say(
                f"coda: supervisor pid {os.getpid()} serving {journal_path} on "
                f"{path}{tcp_part} with {supervisor.pool.size} workers "
                f"({len(supervisor.runs)} unfinished runs recovered)"
            )
            if ready_file:
                Path(ready_file).write_text(str(os.getpid()))
            await stop.wait()
            say("coda: stopping")
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
    """Hold the journal's locks while serving it: one supervisor per journal.

    A second supervisor would recover the runs the first is running, record
    their tries as interrupted and run them again, and take over the first
    one's socket. The locks are flocks, which the kernel releases however their
    holder ends, SIGKILL included, so a crashed supervisor never keeps the next
    one out. Workers do not inherit them.

    A journal may have several names, so there are two: one on a file beside
    the socket, named by the journal's real path (symlinks resolved), and one
    named by the journal file's device and inode, which its hard links and bind
    mounts share. As a hard link may be in any directory, that one is in a
    directory of this user's under the temporary directory, and removed when
    done (a supervisor given another TMPDIR, or a private /tmp, does not see
    it). Neither lock is on the journal itself: SQLite holds POSIX locks on
    it, which this process closing any descriptor of the file would drop.
    """
    journal = Path(journal_path).resolve()
    beside = journal.parent / ".coda" / f"{journal.name}.lock"
    try:
        beside.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_lock(beside, exc) from exc
    with _flock(beside, journal):
        file = _journal_file(journal)
        aliases = _user_lock_directory() / f"journal-{file.st_dev}-{file.st_ino}.lock"
        with _flock(aliases, journal, remove=True):
            yield


@contextlib.contextmanager
def _flock(path: Path, journal: Path, *, remove: bool = False) -> Iterator[None]:
    """Hold an flock on `path`, which says who holds it and for what journal.

    With `remove`, the file is removed when done, before the lock is let go;
    so a file locked is only ours if it is still the one at `path`.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise _cannot_lock(path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            holder, _, served = held.partition("\n")
            served = served.strip() or str(journal)
            alias = "" if served == str(journal) else f" (the same file as {journal})"
            raise CodaError(
                f"another supervisor (pid {holder.strip() or '?'}) is serving "
                f"{served}{alias}; stop it before starting another, or talk to it "
                "with `coda submit` and friends"
            ) from None
        if not remove or _is_at(fd, path):
            break
        os.close(fd)  # its holder removed it as we opened it: try again
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{journal}\n".encode(), 0)
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)
        os.close(fd)


def _cannot_lock(path: Path, exc: OSError) -> CodaError:
    return CodaError(
        f"cannot make the lock file {path} that keeps a second supervisor off "
        f"the journal ({exc.strerror or exc}); coda run writes the journal and "
        "its lock beside it, so its folder must be writable: check the "
        "permissions and the mount, or pass --journal with a writable path"
    )


def _is_at(fd: int, path: Path) -> bool:
    try:
        there = path.stat()
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _journal_file(journal: Path) -> os.stat_result:
    """The journal file's identity, made first if there is no file yet.

    A hard link to the journal can be made once the file exists, so it must
    have its identity locked from the start. An empty file is a journal yet to
    be created, to SQLite and to Coda. Nothing of this process has the file
    open yet, so closing the descriptor that made it drops no lock of SQLite's.
    """
    try:
        return os.stat(journal)
    except FileNotFoundError:
        os.close(os.open(journal, os.O_RDONLY | os.O_CREAT, 0o644))
        return os.stat(journal)


def _user_lock_directory() -> Path:
    """`coda-UID` in the temporary directory, this user's alone."""
    path = Path(tempfile.gettempdir()) / f"coda-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        # Another user's: whoever made it could hold, or swap, the locks in it.
        raise CodaError(
            f"{path} is not a directory of this user's; coda run keeps the locks "
            "that tell it whether a journal is already served there: remove it"
        )
    return path
