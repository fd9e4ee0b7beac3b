"""The long chaos run; writes its figures to docs/chaos-results.md.

    .venv/bin/python -m tests.chaos.long --runs 500 --kills 100 --seed 7 [--snapshot]

Same harness and checks as the CI test (`test_chaos.py`), more of everything:
`--rounds` arms every named crash point that many times (each with its own
count), `--kills` random SIGKILLs of workers and supervisor. Then the
readers-beside-the-writer measurement (`readers.py`). Exit status 1 if any
check failed; the working directory (journal, side-effect file, logs) is then
kept and named. `--snapshot` runs the code of HEAD from a clean copy, for
when others are editing the working tree meanwhile.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from coda.runtime.faults import POINTS
from tests.chaos.harness import Report, run_chaos
from tests.chaos.procs import REPO, Coda, short_workdir
from tests.chaos.readers import measure


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def render(
    args: argparse.Namespace,
    report: Report,
    problems: list[str],
    readers: dict[str, Any] | None,
    seconds: float,
) -> str:
    t, f = report.tally, report.figures
    if args.commit:
        source = f"{args.commit} (a clean copy of it: --snapshot)"
    else:
        dirty = " (with uncommitted changes)" if _git("status", "--porcelain") else ""
        source = f"{_git('rev-parse', '--short', 'HEAD')}{dirty}"
    command = (
        f"python -m tests.chaos.long --runs {args.runs} --kills {args.kills} "
        f"--rounds {args.rounds} --workers {args.workers} --delay {args.delay} "
        f"--seed {args.seed}"
    )
    crashes = sum(t.crash_hits.values())
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(f.statuses.items()))
    lines = [
        "# Chaos results",
        "",
        "Written by `tests/chaos/long.py`; what is checked and why is in",
        "`tests/chaos/checks.py`, how the crashes are made in",
        "`tests/chaos/harness.py`.",
        "",
        f"* command: `{command}`",
        f"* when: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, commit {source}",
        f"* machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        f"* duration: {seconds:.0f} s (chaos {t.seconds:.0f} s)",
        f"* verdict: **{'PASS' if not problems else 'FAIL'}**, "
        f"{len(problems)} problems",
        "",
        "## What was done",
        "",
        "| | |",
        "| --- | --- |",
        f"| runs submitted (explicit run ids) | {f.runs} |",
        f"| run outcomes | {outcomes} |",
        f"| random SIGKILLs planned (`--kills`) | {args.kills} |",
        f"| supervisor starts (restarts) | {t.episodes} ({t.restarts}) |",
        f"| supervisor killed with SIGKILL (random, or after a worker point) | "
        f"{t.supervisor_sigkills} |",
        f"| supervisor stopped with SIGTERM | {t.supervisor_sigterms} |",
        f"| workers killed with SIGKILL | {t.worker_sigkills} |",
        f"| processes that died at a named crash point | {crashes} |",
        f"| named crash points armed / reached | {len(t.points_armed)} / "
        f"{len(t.points_reached)} of {len(POINTS)} |",
        f"| supervisors that died before serving clients | {t.early_crashes} |",
        f"| submit requests / acknowledged | {t.submit_requests} / {t.submit_acks} |",
        f"| resubmissions after no acknowledgement | {t.resubmissions} |",
        f"| duplicate submissions sent at the same moment | {t.duplicate_submits} |",
        f"| cancel requests / acknowledged | {t.cancel_requests} / {t.cancel_acks} |",
        f"| task steps (of which reused from cache) | {f.steps} ({f.steps_reused}) |",
        f"| task tries started / executions seen | {f.tries_started} / "
        f"{f.executions} |",
        f"| tries lost to a crash (WorkerLost, Interrupted, TaskTimeout) | "
        f"{f.crash_failures} |",
        f"| re-executions, each explained by a lost try | "
        f"{f.reexecutions_after_crash} |",
        "",
        "## What must be zero",
        "",
        "| | |",
        "| --- | --- |",
        f"| acknowledged submissions missing from the journal | {f.acked_lost} |",
        f"| runs not finished | {f.runs_unfinished} |",
        f"| results differing from the crash-free run | {f.results_wrong} |",
        f"| executions begun after the step's completion was recorded | "
        f"{f.executions_after_completion} |",
        f"| executions not explained by a durable start or a crash | "
        f"{f.executions_unexplained} |",
        f"| `coda doctor` problems | {f.doctor_problems} |",
        f"| all problems found | {len(problems)} |",
        "",
        "## Crash points",
        "",
        "| point | episodes armed | episodes reached | processes died there |",
        "| --- | --- | --- | --- |",
    ]
    for point in sorted(POINTS):
        lines.append(
            f"| `{point}` | {t.points_armed[point]} | {t.points_reached[point]} | "
            f"{t.crash_hits[point]} |"
        )
    if readers is not None:
        quiet, control, busy = readers["quiet"], readers["control"], readers["busy"]
        r = readers["readers"]
        lines += [
            "",
            "## Readers beside a busy writer",
            "",
            f"Bursts of {quiet.runs} runs (`sequence`, two tasks each) submitted",
            "at once; completions sampled every 20 ms. With readers: `coda history`",
            "and `coda ls` in a loop (subprocesses) and a thread reading histories",
            "and run lists directly, every 5 ms. As a control, the same readers on",
            "a copy of the journal: the same work for the processors, another file.",
            "",
            "| | runs | completions/s | longest stretch without a completion |",
            "| --- | --- | --- | --- |",
        ]
        for name, burst in (
            ("no readers", quiet),
            ("readers on a copy (control)", control),
            ("readers on the live journal", busy),
        ):
            lines.append(
                f"| {name} | {burst.runs} | {burst.per_second:.0f} | "
                f"{burst.longest_stall * 1000:.0f} ms |"
            )
        failures = len(r.cli_failures) + len(r.direct_failures)
        lines += [
            "",
            f"Readers on the live journal: {r.cli_calls} `coda history`/`coda ls` "
            f'calls, {r.direct_reads} direct reads; failures or "database is '
            f'locked": {failures}.',
            "",
            f"On {os.cpu_count()} CPUs the readers compete with the supervisor and",
            "its workers for the processors: compare the live journal with the",
            "control, not with no readers at all.",
        ]
    if problems:
        lines += ["", "## Problems", ""] + [f"* {p}" for p in problems[:100]]
    return "\n".join(lines) + "\n"


def _in_snapshot(argv: list[str], out: Path) -> int:
    """Run this very command on a clean copy of HEAD (others may be editing)."""
    commit = _git("rev-parse", "--short", "HEAD")
    snapshot = Path(tempfile.mkdtemp(prefix="coda-snapshot-", dir="/tmp"))
    try:
        archive = subprocess.run(
            ["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True
        )
        subprocess.run(
            ["tar", "-x", "-C", str(snapshot)], input=archive.stdout, check=True
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(snapshot / "src"), str(snapshot)])
        rest = [a for a in argv if a != "--snapshot"]
        rest += ["--commit", commit, "--out", str(out.resolve())]
        done = subprocess.run(
            [sys.executable, "-m", "tests.chaos.long", *rest], cwd=snapshot, env=env
        )
        return done.returncode
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.long")
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--delay", type=float, default=0.01, help="longest sleep of a task, seconds"
    )
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--readers-runs", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "chaos-results.md")
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="run HEAD's code from a clean copy, not the working tree",
    )
    parser.add_argument("--commit", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.snapshot:
        return _in_snapshot(argv if argv is not None else sys.argv[1:], args.out)

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="coda-chaos-", dir="/tmp"))
    report = run_chaos(
        workdir,
        seed=args.seed,
        runs=args.runs,
        kills=args.kills,
        rounds=args.rounds,
        workers=args.workers,
        delay=args.delay,
        finish_within=300.0,
        say=lambda text: print(text, flush=True),
    )
    problems = list(report.problems)
    unreached = sorted(POINTS - set(report.tally.points_reached))
    if unreached:
        problems.append(f"crash points armed but never reached: {unreached}")

    readers = None
    if args.readers_runs:
        with (
            short_workdir() as rdir,
            Coda(rdir, "tests.chaos.chaos_app", workers=args.workers) as coda,
        ):
            readers = measure(coda, args.readers_runs, cli_calls=40)
        r = readers["readers"]
        problems += r.cli_failures + r.direct_failures

    text = render(args, report, problems, readers, time.monotonic() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if problems:
        print(f"FAILED; kept {workdir}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
