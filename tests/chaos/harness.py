"""Chaos: a workload through a real `coda run`, killed again and again.

The promise under test (README, "Crash safety"): once the supervisor has
acknowledged something, it survives the crash of any process at any moment; a
task whose completion is in the journal never runs again; a task runs more
than once only when its worker or the supervisor died before its completion
was durable; and every run ends with the result a crash-free run gives.

How a chaos run goes. The workload (`workload.py`) is submitted over a series
of *episodes*. Each episode starts `python -m coda run tests.chaos.chaos_app`
on the same journal, submits its share of the runs (and again every
submission that was never acknowledged, with the same run id), cancels the
runs meant to be cancelled, and ends with the supervisor dead:

* an episode per named crash point (`coda.runtime.faults.POINTS`), armed
  through `CODA_CRASH` in the supervisor's environment, with a count drawn
  from the seed. Workers inherit that environment, so a worker point makes
  every worker of the episode die at its n-th pass; the episode then ends with
  a SIGKILL or a SIGTERM of the supervisor. `supervisor.shutdown` is reached
  by a SIGTERM;
* episodes of random kills: SIGKILL of workers at random moments, then of the
  supervisor;
* a last episode, with nothing armed, that finishes every run.

After every episode, with the supervisor dead, the journal is read: every
acknowledged submission must be in it, every acknowledged cancellation that
changed something must have cancelled its run. At the end the journal, the
tasks' side-effect file and a crash-free reference (`reference.py`) are
compared (`checks.py`), and `coda doctor` must find nothing.

The seed fixes the workload, the plan of episodes, the counts of the crash
points and the delays before each kill. It does not fix the operating
system's scheduling, so the same seed gives the same plan and workload, not
the same interleaving; a failure prints its seed, and a rerun with it is the
closest reproduction there is.

Processes: the supervisor is started in a session of its own; its workers
are found as its children (`/proc/PID/task/*/children`) and remembered with
their start time, so that only those very processes are ever signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coda.journal.sqlite import read_runs_sync
from coda.runtime.client import Client, default_socket_path
from coda.runtime.faults import CRASH_EXIT_CODE, POINTS
from tests.chaos.procs import (
    ProcessId,
    children,
    env_for,
    kill_exact,
    running,
    start_time,
)
from tests.chaos.workload import Submission, args_for, make_workload

PYTHON = sys.executable
APP = "tests.chaos.chaos_app"
CRASH_LINE = re.compile(r"coda: crash point (\S+) reached")

# How far into an episode a supervisor point is armed: counts drawn in 1..N.
# Each is reached well within an episode that has work to do.
_COUNTS = {
    "supervisor.before_commit": 40,
    "supervisor.after_commit": 40,
    "supervisor.after_dispatch": 20,
    "supervisor.outcome_received": 30,
    "supervisor.before_ack": 8,
    "supervisor.after_ack": 8,
}
_WORKER_COUNT = 6


# The plan.


@dataclass
class Episode:
    arm: str | None  # "point:count" for CODA_CRASH
    end: str  # "exit", "after-crash", "term", "kills" or "final"
    new_runs: int = 0
    worker_kills: list[float] = field(default_factory=list)
    stop_after: float = 0.0
    stop_signal: int = signal.SIGKILL

    @property
    def point(self) -> str | None:
        return self.arm.partition(":")[0] if self.arm else None


def make_plan(
    seed: int, runs: int, kills: int, points: list[str], rounds: int = 1
) -> list[Episode]:
    """Episodes: each point armed `rounds` times, `kills` random SIGKILLs."""
    rng = random.Random(f"chaos-plan-{seed}")
    episodes = []
    for point in sorted(points) * rounds:
        if point == "supervisor.shutdown":
            episodes.append(
                Episode(
                    f"{point}:1",
                    "term",
                    stop_after=rng.uniform(0.3, 1.5),
                    stop_signal=signal.SIGTERM,
                )
            )
        elif point.startswith("supervisor."):
            count = rng.randint(1, _COUNTS.get(point, 20))
            episodes.append(Episode(f"{point}:{count}", "exit"))
        else:
            count = rng.randint(1, _WORKER_COUNT)
            episodes.append(
                Episode(
                    f"{point}:{count}",
                    "after-crash",
                    stop_after=rng.uniform(0.0, 0.8),
                    stop_signal=rng.choice([signal.SIGKILL, signal.SIGTERM]),
                )
            )
    left = kills
    while left > 0:
        workers = rng.randint(0, min(2, left - 1))
        episodes.append(
            Episode(
                None,
                "kills",
                worker_kills=[rng.uniform(0.05, 0.8) for _ in range(workers)],
                stop_after=rng.uniform(0.1, 1.5),
            )
        )
        left -= workers + 1
    rng.shuffle(episodes)
    share = runs // (len(episodes) + 1)
    for episode in episodes:
        episode.new_runs = share
        if episode.point in ("supervisor.before_ack", "supervisor.after_ack"):
            # Its count must be reachable with this episode's requests.
            name, _, armed = (episode.arm or "").partition(":")
            episode.arm = f"{name}:{min(int(armed), max(share, 1))}"
    episodes.append(Episode(None, "final", new_runs=runs - share * len(episodes)))
    return episodes


# The run.


@dataclass
class Tally:
    episodes: int = 0
    restarts: int = 0
    supervisor_sigkills: int = 0
    supervisor_sigterms: int = 0
    worker_sigkills: int = 0
    crash_exits: int = 0
    points_armed: Counter[str] = field(default_factory=Counter)
    points_reached: Counter[str] = field(default_factory=Counter)  # episodes
    crash_hits: Counter[str] = field(default_factory=Counter)  # processes died
    submit_requests: int = 0
    submit_acks: int = 0
    resubmissions: int = 0
    duplicate_submits: int = 0
    cancel_requests: int = 0
    cancel_acks: int = 0
    request_errors: Counter[str] = field(default_factory=Counter)
    early_crashes: int = 0  # the supervisor died before it served clients
    seconds: float = 0.0


class Chaos:
    """One chaos run in `workdir` (short: the socket path must fit 108 bytes)."""

    def __init__(
        self,
        workdir: Path,
        *,
        seed: int,
        runs: int,
        kills: int,
        points: list[str] | None = None,
        rounds: int = 1,
        workers: int = 2,
        delay: float = 0.01,
        finish_within: float = 60.0,
        say: Any = None,
    ) -> None:
        self.workdir = workdir
        self.seed = seed
        self.workers = workers
        self.finish_within = finish_within
        self.say = say or (lambda text: None)
        self.rng = random.Random(f"chaos-driver-{seed}")
        self.journal = workdir / "coda.db"
        self.socket = default_socket_path(self.journal)
        self.side = workdir / "side.log"
        self.counters = workdir / "counters"
        self.counters.mkdir(parents=True, exist_ok=True)
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.workload = make_workload(seed, runs, delay)
        self.plan = make_plan(seed, runs, kills, sorted(points or POINTS), rounds)
        self.tally = Tally()
        self.problems: list[str] = []
        # What the client was told.
        self.acked: set[str] = set()
        self.tried: list[Submission] = []  # submitted at least once, in order
        self.cancel_sent: set[str] = set()
        self.cancel_acked: set[str] = set()
        self.cancel_changed: set[str] = set()  # an ack said "changed"
        self.seen_workers: set[ProcessId] = set()
        self.supervisors: list[ProcessId] = []
        self._next = 0  # next submission of the workload never tried

    # Driving.

    async def run(self) -> None:
        started = time.monotonic()
        try:
            for number, episode in enumerate(self.plan, 1):
                self.say(
                    f"episode {number}/{len(self.plan)}: {episode.end} "
                    f"{episode.arm or ''} (+{episode.new_runs} runs)"
                )
                await self._episode(number, episode)
        finally:
            self.cleanup()
            self.tally.seconds = time.monotonic() - started

    async def _episode(self, number: int, episode: Episode) -> None:
        self.tally.episodes += 1
        if number > 1:
            self.tally.restarts += 1
        if episode.point:
            self.tally.points_armed[episode.point] += 1
        log = self.logs / f"episode-{number:03d}.log"
        proc = await self._start(episode.arm, log)
        watcher = asyncio.create_task(self._watchchildren(proc.pid))
        client_work: asyncio.Task[None] | None = None
        try:
            clients = await self._connect(proc)
            if clients is None:
                self.tally.early_crashes += 1
            else:
                client_work = asyncio.create_task(self._client(clients, episode))
            if episode.end == "final":
                await self._finish(proc, client_work)
            else:
                await self._end(proc, episode, log)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            watcher.cancel()
            if client_work is not None:
                client_work.cancel()
                with contextlib.suppress(BaseException):
                    await client_work
        if proc.returncode == CRASH_EXIT_CODE:
            self.tally.crash_exits += 1
        reached = CRASH_LINE.findall(log.read_text(errors="replace"))
        self.tally.points_reached.update(set(reached))
        self.tally.crash_hits.update(reached)
        if episode.end == "final" and proc.returncode != 0:
            self.problems.append(
                f"the last supervisor did not stop cleanly on SIGTERM (exit code "
                f"{proc.returncode}); see {log}"
            )
        self._check_acknowledged(number)

    async def _start(self, arm: str | None, log: Path) -> asyncio.subprocess.Process:
        env = env_for(crash=arm)
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                PYTHON,
                "-m",
                "coda",
                "run",
                APP,
                "--journal",
                str(self.journal),
                "--workers",
                str(self.workers),
                cwd=self.workdir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        started = start_time(proc.pid)
        if started is not None:
            self.supervisors.append((proc.pid, started))
        return proc

    async def _watchchildren(self, pid: int) -> None:
        while True:
            self.seen_workers.update(children(pid))
            await asyncio.sleep(0.05)

    async def _connect(
        self, proc: asyncio.subprocess.Process
    ) -> tuple[Client, Client] | None:
        """Two connections once the socket serves; None if the supervisor died."""
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                return None
            try:
                first = await Client.connect(self.socket, timeout=1.0)
            except Exception:
                await asyncio.sleep(0.05)
                continue
            try:
                second = await Client.connect(self.socket, timeout=1.0)
            except Exception:
                await first.close()
                return None
            return first, second
        self.problems.append(f"supervisor pid {proc.pid} never served its socket")
        return None

    async def _end(
        self, proc: asyncio.subprocess.Process, episode: Episode, log: Path
    ) -> None:
        if episode.end == "exit":
            try:
                await asyncio.wait_for(proc.wait(), 20.0)
            except TimeoutError:
                self.say(f"  {episode.arm} not reached; killing the supervisor")
                await self._signal_supervisor(proc, signal.SIGKILL)
            return
        if episode.end == "after-crash":
            deadline = time.monotonic() + 20.0
            while time.monotonic() < deadline and proc.returncode is None:
                if f"crash point {episode.point} reached" in log.read_text(
                    errors="replace"
                ):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(episode.stop_after)
        elif episode.end == "kills":
            for delay in episode.worker_kills:
                await asyncio.sleep(delay)
                workers = [p for p in children(proc.pid) if running(p)]
                if workers and kill_exact(self.rng.choice(workers)):
                    self.tally.worker_sigkills += 1
            await asyncio.sleep(episode.stop_after)
        elif episode.end == "term":
            await asyncio.sleep(episode.stop_after)
        await self._signal_supervisor(proc, episode.stop_signal)

    async def _signal_supervisor(
        self, proc: asyncio.subprocess.Process, sig: int
    ) -> None:
        if proc.returncode is not None:
            return
        self.seen_workers.update(children(proc.pid))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
            if sig == signal.SIGKILL:
                self.tally.supervisor_sigkills += 1
            else:
                self.tally.supervisor_sigterms += 1
        try:
            await asyncio.wait_for(proc.wait(), 15.0)
        except TimeoutError:
            self.problems.append(
                f"supervisor pid {proc.pid} did not exit within 15 s of signal {sig}"
            )
            proc.kill()

    # The client.

    async def _client(self, clients: tuple[Client, Client], episode: Episode) -> None:
        first, second = clients
        pending: set[asyncio.Task[Any]] = set()

        def start(coro: Any) -> None:
            task = asyncio.create_task(coro)
            pending.add(task)
            task.add_done_callback(pending.discard)

        try:
            # What was never acknowledged goes again, same ids.
            for sub in [s for s in self.tried if s.run_id not in self.acked]:
                self.tally.resubmissions += 1
                start(self._submit(first, sub))
            for run_id in sorted(self.cancel_sent - self.cancel_acked):
                start(self._cancel(first, run_id, 0.0))
            # Then this episode's share of new runs, a few milliseconds apart.
            # The last episode submits whatever earlier ones had no time for.
            share = len(self.workload) if episode.end == "final" else episode.new_runs
            for _ in range(share):
                if self._next >= len(self.workload):
                    break
                sub = self.workload[self._next]
                self._next += 1
                self.tried.append(sub)
                start(self._submit(first, sub))
                if self.rng.random() < 0.1:
                    # The same id on another connection at the same moment.
                    self.tally.duplicate_submits += 1
                    start(self._submit(second, sub))
                await asyncio.sleep(self.rng.uniform(0.0, 0.03))
            if episode.end == "final":
                # Everything acknowledged, once more: each must be known already.
                for sub in self.tried:
                    if sub.run_id in self.acked:
                        start(self._submit(first, sub, must_exist=True))
            while pending:
                await asyncio.wait(set(pending))
        finally:
            for task in pending:
                task.cancel()
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.close()

    async def _submit(
        self, client: Client, sub: Submission, *, must_exist: bool = False
    ) -> None:
        self.tally.submit_requests += 1
        args = args_for(sub, self.side, self.counters)
        try:
            reply = await client.request(
                "submit", workflow=sub.workflow, args=args, run_id=sub.run_id
            )
        except Exception as exc:
            self.tally.request_errors[type(exc).__name__] += 1
            return
        self.tally.submit_acks += 1
        if must_exist and reply.get("created"):
            self.problems.append(
                f"run {sub.run_id}: its submission was acknowledged earlier, yet "
                "submitting it again created it: the acknowledged run was lost"
            )
        self.acked.add(sub.run_id)
        if sub.cancel_after is not None and sub.run_id not in self.cancel_sent:
            await self._cancel(client, sub.run_id, sub.cancel_after)

    async def _cancel(self, client: Client, run_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        self.cancel_sent.add(run_id)
        self.tally.cancel_requests += 1
        try:
            reply = await client.request("cancel", run_id=run_id, reason="chaos")
        except Exception as exc:
            self.tally.request_errors[type(exc).__name__] += 1
            return
        self.tally.cancel_acks += 1
        self.cancel_acked.add(run_id)
        if reply.get("changed"):
            self.cancel_changed.add(run_id)

    # The last episode.

    async def _finish(
        self, proc: asyncio.subprocess.Process, client_work: asyncio.Task[None] | None
    ) -> None:
        # Lose every worker at once, with no later loss or restart to come and
        # rescue a run left behind.
        killer = asyncio.create_task(self._kill_workers(proc))
        if client_work is not None:
            await client_work
        wanted = {s.run_id for s in self.workload}
        deadline = time.monotonic() + self.finish_within
        left: set[str] = wanted
        while time.monotonic() < deadline and proc.returncode is None:
            summaries = {s.run_id: s for s in read_runs_sync(self.journal, limit=10**6)}
            left = {
                r
                for r in wanted
                if r not in summaries
                or summaries[r].status not in ("completed", "failed", "cancelled")
            }
            if not left:
                break
            await asyncio.sleep(0.2)
        if left:
            shown = ", ".join(sorted(left)[:10])
            self.problems.append(
                f"{len(left)} runs did not finish within {self.finish_within:g} s "
                f"of the last start: {shown}"
            )
        killer.cancel()
        await self._signal_supervisor(proc, signal.SIGTERM)

    async def _kill_workers(self, proc: asyncio.subprocess.Process) -> None:
        await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        for worker in children(proc.pid):
            if kill_exact(worker):
                self.tally.worker_sigkills += 1

    # After every episode.

    def _check_acknowledged(self, number: int) -> None:
        """With the supervisor dead: what it acknowledged must be in the journal."""
        if not self.journal.exists():
            if self.acked:
                self.problems.append("the journal is gone, acknowledged runs with it")
            return
        try:
            runs = {s.run_id: s for s in read_runs_sync(self.journal, limit=10**6)}
        except Exception as exc:  # a fresh journal may not have its schema yet
            if self.acked:
                self.problems.append(
                    f"after episode {number}: journal unreadable: {exc}"
                )
            return
        lost = sorted(self.acked - set(runs))
        if lost:
            self.problems.append(
                f"after episode {number}: {len(lost)} acknowledged submissions are "
                f"not in the journal: {', '.join(lost[:10])}"
            )
        for run_id in sorted(self.cancel_changed):
            status = runs[run_id].status if run_id in runs else None
            if status != "cancelled":
                self.problems.append(
                    f"after episode {number}: run {run_id}: its cancellation was "
                    f"acknowledged as done, yet the run is {status}"
                )

    def cleanup(self) -> None:
        """Make sure no process this run started is left."""
        deadline = time.monotonic() + 5.0
        procs = self.supervisors + sorted(self.seen_workers)
        while time.monotonic() < deadline and any(running(p) for p in procs):
            time.sleep(0.05)
        left = [p for p in procs if running(p)]
        for proc in left:
            kill_exact(proc)
        if left:
            self.problems.append(
                f"processes outlived their supervisor by 5 s and were killed: "
                f"{[p[0] for p in left]}"
            )


# A whole chaos run, checked.

# Log lines at ERROR that a chaos run provokes on purpose.
_EXPECTED_ERRORS = (
    "workers keep dying right after they start",  # worker crash points, count 1
    "failed its handshake",  # a worker we killed while it was starting
)


def log_problems(logs: Path) -> list[str]:
    """ERROR lines and tracebacks in the supervisors' logs (workers log there too)."""
    problems = []
    for log in sorted(logs.glob("*.log")):
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            if (" ERROR " in line or "Traceback" in line) and not any(
                text in line for text in _EXPECTED_ERRORS
            ):
                problems.append(f"{log.name}:{number}: {line.strip()}")
    return problems


@dataclass
class Report:
    seed: int
    workdir: Path
    tally: Tally
    figures: Any
    problems: list[str]


def run_chaos(
    workdir: Path,
    *,
    seed: int,
    runs: int,
    kills: int,
    points: list[str] | None = None,
    rounds: int = 1,
    workers: int = 2,
    delay: float = 0.01,
    finish_within: float = 60.0,
    say: Any = None,
) -> Report:
    from tests.chaos.checks import check_journal
    from tests.chaos.reference import compute_reference

    chaos = Chaos(
        workdir,
        seed=seed,
        runs=runs,
        kills=kills,
        points=points,
        rounds=rounds,
        workers=workers,
        delay=delay,
        finish_within=finish_within,
        say=say,
    )
    asyncio.run(chaos.run())
    reference = compute_reference(chaos.workload, workdir / "reference")
    problems, figures = check_journal(
        chaos.journal,
        chaos.side,
        chaos.workload,
        reference,
        chaos.acked,
        chaos.cancel_sent,
        chaos.cancel_changed,
    )
    problems = chaos.problems + problems + log_problems(chaos.logs)
    return Report(seed, workdir, chaos.tally, figures, problems)
