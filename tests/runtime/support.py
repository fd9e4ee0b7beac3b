"""Helpers for end-to-end tests: a real `coda run` with real worker processes.

`CodaProcess` runs `python -m coda run e2e_app --journal DIR/coda.db` with two
workers in a fresh short directory (a Unix socket path must fit in 108 bytes)
and waits until its socket accepts a client and both workers are up. Each
`coda run` leads a process session of its own, so that its workers can be found
even after it was killed and they were re-parented. At teardown it is stopped
(SIGTERM, then SIGKILL after a timeout) and every process of its sessions must
be gone. Only processes started here, or found as their children or session
members, are ever signalled, by pid checked against the process's start time
so that a reused pid is never hit.

The journal is read directly (read-only) to check what happened; the CLI and
`coda.runtime.client` are what the tests drive the supervisor with.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from coda.errors import JournalError
from coda.journal.events import Event
from coda.journal.sqlite import SQLiteJournal, read_history_sync, read_runs_sync
from coda.runtime.client import Client, SyncClient, default_socket_path

REPO = Path(__file__).resolve().parents[2]
APPS = Path(__file__).resolve().parent / "apps"
PYTHON = sys.executable
APP = "e2e_app"

T = TypeVar("T")


# Waiting.


def wait_for(
    probe: Callable[[], T], timeout: float = 10.0, what: str = "condition"
) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


# Processes, through /proc.

ProcessId = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def process_id(pid: int) -> ProcessId | None:
    fields = _stat(pid)
    return None if fields is None else (pid, int(fields[19]))


def is_running(proc: ProcessId) -> bool:
    """The very process (not a reused pid) exists and is not a zombie."""
    fields = _stat(proc[0])
    return fields is not None and int(fields[19]) == proc[1] and fields[0] != "Z"


def _live_processes(field: int, value: int) -> list[ProcessId]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is not None and int(fields[field]) == value and fields[0] != "Z":
            found.append((int(entry), int(fields[19])))
    return found


def children_of(pid: int) -> list[ProcessId]:
    """Live child processes of `pid`."""
    return _live_processes(1, pid)


def session_members(sid: int) -> list[ProcessId]:
    """Live processes of session `sid`: a session leader's descendants, even
    those whose parent has died (they are re-parented, their session stays)."""
    return _live_processes(3, sid)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_exact(proc: ProcessId, sig: int = signal.SIGKILL) -> None:
    if is_running(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc[0], sig)


def processes_mentioning(text: str) -> list[ProcessId]:
    """Processes whose command line contains `text` (a path unique to a test)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and text in cmdline(int(entry)):
            proc = process_id(int(entry))
            if proc is not None and is_running(proc):
                found.append(proc)
    return found


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(APPS), str(REPO), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env.pop("CODA_ADDRESS", None)
    env.pop("CODA_JOURNAL", None)
    env.pop("CODA_CRASH", None)
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


# The supervisor.


class CodaProcess:
    """One `coda run` on a journal; may be stopped and started again."""

    def __init__(
        self,
        workdir: Path,
        *,
        app: str = APP,
        workers: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.extra_args = extra_args
        given = list(extra_args)
        self.token = given[given.index("--token") + 1] if "--token" in given else None
        self.app = app
        self.workers = workers
        self.journal = workdir / "coda.db"
        self.socket = default_socket_path(self.journal)
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        # Every worker process seen, so that teardown can check they are gone.
        self.seen_workers: set[ProcessId] = set()
        # Each `coda run` leads a session of its own: its pid is the session id.
        self.sessions: list[int] = []

    # Lifecycle.

    def command(self) -> list[str]:
        command = [PYTHON, "-m", "coda", "run", self.app]
        return [
            *command,
            "--journal",
            str(self.journal),
            "--workers",
            str(self.workers),
            *self.extra_args,
        ]

    def start(self, timeout: float = 20.0) -> None:
        assert self.process is None or self.process.poll() is not None
        log = self.workdir / f"supervisor-{len(self.logs) + 1}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                env=base_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.sessions.append(self.process.pid)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        async def try_connect() -> bool:
            try:
                client = await Client.connect(
                    self.socket, timeout=1.0, token=self.token
                )
            except Exception:
                return False
            await client.close()
            return True

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(
                    f"coda run exited with {self.process.returncode} before it "
                    f"served its socket:\n{self.log_text()}"
                )
            return asyncio.run(try_connect())

        wait_for(ready, timeout, f"the supervisor's socket {self.socket}")
        wait_for(
            lambda: len(self.worker_pids()) == self.workers,
            timeout,
            f"{self.workers} worker processes",
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def worker_pids(self) -> list[ProcessId]:
        """The supervisor's live children: its worker processes."""
        if not self.alive():
            return []
        found = children_of(self.pid)
        self.seen_workers.update(found)
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the supervisor and wait for it; SIGKILL if it takes too long."""
        assert self.process is not None
        self.worker_pids()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.worker_pids()
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        """The supervisor's exit code, once it has exited by itself."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"coda run did not exit within {timeout:g} s")

    def kill(self) -> None:
        """SIGKILL the supervisor, leaving its workers to notice on their own."""
        self.stop(signal.SIGKILL)

    def workers_gone(self, timeout: float = 10.0) -> None:
        wait_for(
            lambda: not [p for p in self.seen_workers if is_running(p)],
            timeout,
            "the supervisor's worker processes to exit",
        )

    def leftovers(self) -> list[ProcessId]:
        """Processes of the sessions of `coda run`s started here, still alive."""
        return [p for sid in self.sessions for p in session_members(sid)]

    def cleanup(self) -> list[str]:
        """Stop everything; return what went wrong doing so (nothing, normally)."""
        problems = []
        if self.process is not None and self.process.poll() is None:
            code = self.stop()
            if code != 0:
                problems.append(f"coda run exited with {code} on SIGTERM")
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and (
            self.leftovers() or any(is_running(p) for p in self.seen_workers)
        ):
            time.sleep(0.05)
        stragglers = {p for p in self.seen_workers if is_running(p)}
        stragglers.update(self.leftovers())
        for proc in stragglers:
            kill_exact(proc)
        if stragglers:
            problems.append(f"processes left behind, killed: {sorted(stragglers)}")
        return problems

    def log_text(self) -> str:
        return "".join(
            f"--- {log.name}\n{log.read_text(errors='replace')}"
            for log in self.logs
            if log.exists()
        )

    # Talking to it.

    def client(self) -> SyncClient:
        return SyncClient(self.socket, token=self.token)

    def cli(
        self, *args: str, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `python -m coda ARGS` in the journal's directory."""
        return subprocess.run(
            [PYTHON, "-m", "coda", *args],
            cwd=self.workdir,
            env=base_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # Reading the journal (read-only, with or without a supervisor).

    def history(self, run_id: str) -> list[Event]:
        return read_history_sync(self.journal, run_id)

    def runs(self) -> list[Any]:
        return read_runs_sync(self.journal, limit=100_000)


# Fixtures' building blocks.


@contextlib.contextmanager
def fresh_directory() -> Iterator[Path]:
    # Short on purpose: the socket path inside it must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="coda-e2e-", dir="/tmp"))
    try:
        yield path
    finally:
        for proc in processes_mentioning(str(path)):
            # A `coda run` on this directory started by a process the test
            # started (the example pipeline starts its own) and left behind.
            kids = children_of(proc[0])
            kill_exact(proc)
            for kid in kids:
                kill_exact(kid)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_supervisor(
    workdir: Path, extra_args: tuple[str, ...] = (), workers: int = 2
) -> Iterator[CodaProcess]:
    supervisor = CodaProcess(workdir, workers=workers, extra_args=extra_args)
    problems: list[str] = []
    try:
        supervisor.start()
        yield supervisor
    finally:
        problems = supervisor.cleanup()
        # Shown by pytest for a failing test only.
        print(supervisor.log_text())
    assert not problems
    # Whatever a test did to them, the processes never fail unexpectedly.
    assert "Traceback" not in supervisor.log_text()


class FillingJournal(SQLiteJournal):
    """A journal that refuses every append while `full` is set, as a full disk."""

    full = False

    async def append(self, events: Sequence[Event]) -> None:
        if self.full:
            raise JournalError("database or disk is full (simulated)")
        await super().append(events)


def decoded(value: Any) -> Any:
    """A received message with its raw values (`orjson.Fragment`) decoded."""
    if type(value) is orjson.Fragment:
        return orjson.loads(orjson.dumps(value))
    if type(value) is dict:
        return {key: decoded(item) for key, item in value.items()}
    if type(value) is list:
        return [decoded(item) for item in value]
    return value
