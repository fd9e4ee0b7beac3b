"""One `coda run` for a test, and the processes it starts, by pid and start time.

Only processes this module started, or saw as children of one it started, are
ever signalled; each is checked against its start time first, so that a pid
the system handed to somebody else meanwhile is left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coda.journal.events import Event
from coda.journal.sqlite import read_history_sync
from coda.runtime.client import SyncClient, default_socket_path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

ProcessId = tuple[int, int]  # (pid, start time in clock ticks since boot)


def start_time(pid: int) -> int | None:
    """The process's start time; None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def children(pid: int) -> list[ProcessId]:
    """Live children of `pid`, from /proc/PID/task/*/children."""
    found: list[ProcessId] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        for child in text.split():
            started = start_time(int(child))
            if started is not None:
                found.append((int(child), started))
    return found


def running(proc: ProcessId) -> bool:
    return start_time(proc[0]) == proc[1]


def kill_exact(proc: ProcessId, sig: int = signal.SIGKILL) -> bool:
    """Signal the very process `proc`, if it still runs; True if signalled."""
    if not running(proc):
        return False
    try:
        os.kill(proc[0], sig)
    except ProcessLookupError:
        return False
    return True


def env_for(crash: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")])
    )
    for name in ("CODA_CRASH", "CODA_ADDRESS", "CODA_JOURNAL"):
        env.pop(name, None)
    if crash:
        env["CODA_CRASH"] = crash
    return env


@contextmanager
def short_workdir(prefix: str = "coda-chaos-") -> Iterator[Path]:
    """A fresh directory under /tmp: a Unix socket path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Coda:
    """`python -m coda run APP` on `workdir/coda.db`, started and stopped by a test."""

    def __init__(self, workdir: Path, app: str, *args: str, workers: int = 1) -> None:
        self.workdir = workdir
        self.app = app
        self.args = list(args)
        self.workers = workers
        self.journal = workdir / "coda.db"
        self.socket = default_socket_path(self.journal)
        self.log = workdir / "supervisor.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.seen: set[ProcessId] = set()

    def __enter__(self) -> Coda:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 30.0) -> None:
        command = [PYTHON, "-m", "coda", "run", self.app]
        command += ["--journal", str(self.journal), "--workers", str(self.workers)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*command, *self.args],
                cwd=self.workdir,
                env=env_for(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = start_time(self.process.pid)
        if started is not None:
            self.seen.add((self.process.pid, started))
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"coda run exited early:\n{self.log_text()}")
            if len(self.worker_pids()) >= self.workers:
                try:
                    SyncClient(self.socket, timeout=1.0).close()
                    return
                except Exception:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"coda run never got ready:\n{self.log_text()}")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        if self.process is None or self.process.poll() is not None:
            return []
        found = children(self.process.pid)
        self.seen.update(found)
        return [pid for pid, _ in found]

    def client(self) -> SyncClient:
        return SyncClient(self.socket)

    def history(self, run_id: str) -> list[Event]:
        return read_history_sync(self.journal, run_id)

    def cli(
        self, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "coda", *args],
            cwd=self.workdir,
            env=env_for(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        self.worker_pids()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(running(p) for p in self.seen):
            time.sleep(0.05)
        for proc in self.seen:
            kill_exact(proc)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_finished(client: SyncClient, run_id: str, timeout: float) -> dict[str, Any]:
    """The run's summary once it is finished; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        summary: dict[str, Any] = client.status(run_id)
        if summary["status"] in ("completed", "failed", "cancelled"):
            return summary
        if time.monotonic() > deadline:
            raise AssertionError(
                f"run {run_id} did not finish within {timeout:g} s: {summary}"
            )
        time.sleep(0.05)
