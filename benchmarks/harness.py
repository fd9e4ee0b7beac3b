"""What every workload shares: a `coda run` to measure, memory, statistics.

`CodaServer` starts the real thing: `python -m coda run APP --journal J
--workers N` as a subprocess on a journal in a temporary directory, with the
default durability (`synchronous=FULL`), waits until its Unix socket answers,
and stops it with SIGTERM (SIGKILL after a grace period). Memory is read from
`/proc/<pid>/status`: `VmRSS` now, `VmHWM` the peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coda.runtime.client import Client, default_socket_path

__all__ = [
    "REPO",
    "CodaServer",
    "machine_info",
    "memory_mb",
    "spread",
    "temp_dir",
]

REPO = Path(__file__).resolve().parent.parent
CODA_APP = "benchmarks.apps.coda_app"


def python_env() -> dict[str, str]:
    """The environment for child processes: the repo importable, quiet logs."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    env.pop("CODA_ADDRESS", None)
    return env


@contextlib.contextmanager
def temp_dir(prefix: str) -> Any:
    path = Path(tempfile.mkdtemp(prefix=f"coda-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def memory_mb(pid: int) -> dict[str, float]:
    """`{"rss": MB now, "hwm": peak MB}` of a live process, from /proc."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["hwm"] = int(line.split()[1]) / 1024
    return out


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class CodaServer:
    """One `coda run` on a journal, as a subprocess; `async with` it."""

    def __init__(
        self,
        journal: Path,
        *,
        workers: int = 2,
        app: str = CODA_APP,
        synchronous: str = "FULL",
        start_timeout: float = 120.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.journal = journal
        self.workers = workers
        self.app = app
        self.synchronous = synchronous
        self.start_timeout = start_timeout
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_at = 0.0
        self.log = journal.with_suffix(".log")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def socket(self) -> Path:
        return default_socket_path(self.journal)

    async def start(self) -> None:
        """Start `coda run` and return once its socket accepts a client."""
        command = [sys.executable, "-m", "coda", "run", self.app]
        command += ["--journal", str(self.journal), "--workers", str(self.workers)]
        command += ["--synchronous", self.synchronous]
        env = python_env() | self.extra_env
        with open(self.log, "ab") as log:
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"coda run exited with {self.process.returncode} before serving; "
                    f"log: {self.log.read_text()[-2000:]}"
                )
            if self.socket.exists():
                try:
                    client = await Client.connect(self.socket, timeout=1.0)
                except Exception:
                    pass
                else:
                    await client.close()
                    self.ready_at = time.perf_counter()
                    return
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(
                    f"coda run did not serve within {self.start_timeout}s"
                )
            await asyncio.sleep(0.005)

    async def client(self) -> Client:
        return await Client.connect(self.socket, timeout=10.0)

    def workers_pids(self) -> list[int]:
        return children_of(self.pid)

    def memory(self) -> dict[str, float]:
        return memory_mb(self.pid)

    async def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM, wait for a clean stop, SIGKILL after `grace` seconds."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if process.poll() is None:
            process.kill()
            process.wait(10)
        self.report_log()
        return process.returncode

    def report_log(self) -> None:
        """Echo what `coda run` logged beyond its start and stop lines."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return
        quiet = ("coda: supervisor pid", "coda: stopping")
        unusual = [line for line in lines if not any(q in line for q in quiet)]
        if unusual:
            shown = "\n  ".join(unusual[:20])
            more = f"\n  ... {len(unusual) - 20} more" if len(unusual) > 20 else ""
            print(f"coda run logged:\n  {shown}{more}", file=sys.stderr, flush=True)

    def kill(self) -> None:
        """SIGKILL the supervisor (its workers exit when their socket closes)."""
        if self.process is not None and self.process.poll() is None:
            workers = self.workers_pids()
            self.process.kill()
            self.process.wait(10)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def __aenter__(self) -> CodaServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def submit_all(
    client: Client, workflow: str, args: Sequence[dict[str, Any]]
) -> list[str]:
    """Submit every run at once (pipelined on one connection); their ids."""
    return list(await asyncio.gather(*(client.submit(workflow, a) for a in args)))


async def wait_all(client: Client, run_ids: Sequence[str]) -> list[dict[str, Any]]:
    summaries = list(await asyncio.gather(*(client.wait(r) for r in run_ids)))
    bad = [s for s in summaries if s["status"] != "completed"]
    if bad:
        raise RuntimeError(
            f"{len(bad)} of {len(summaries)} runs did not complete; first: {bad[0]}"
        )
    return summaries


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and range of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    import sqlite3

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        dirty_files = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty_files = "unknown", []
    return {
        "coda_commit": commit,
        "coda_uncommitted": dirty_files,
        "load_avg_at_start": list(os.getloadavg()),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
