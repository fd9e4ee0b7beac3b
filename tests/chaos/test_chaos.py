"""The crash-safety promise under chaos, short enough for CI (about 40 s).

A fixed seed: 120 runs, every named crash point armed once, 6 random SIGKILLs
of workers and supervisor (see `harness.py` for the plan, `checks.py` for what
is asserted and why). Another seed: `CODA_CHAOS_SEED=N pytest tests/chaos -k
test_chaos`. The long version, which writes docs/chaos-results.md:
`python -m tests.chaos.long`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from coda.runtime.faults import POINTS
from tests.chaos.harness import Report, run_chaos

SEED = int(os.environ.get("CODA_CHAOS_SEED", "1204"))


def failure_text(report: Report, problems: list[str]) -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:40])
    more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
    return (
        f"chaos seed {report.seed}: {len(problems)} problems\n{shown}{more}\n"
        f"{report.tally}\n{report.figures}\n"
        f"Reproduce: CODA_CHAOS_SEED={report.seed} .venv/bin/pytest tests/chaos "
        f"-k test_chaos\nThe journal, the side-effect file and every supervisor's "
        f"log are kept in {report.workdir}"
    )


def test_chaos_loses_nothing_and_runs_nothing_twice() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="coda-chaos-", dir="/tmp"))
    report = run_chaos(workdir, seed=SEED, runs=120, kills=6, finish_within=60)

    problems = list(report.problems)
    unreached = sorted(POINTS - set(report.tally.points_reached))
    if unreached:
        problems.append(f"crash points armed but never reached: {unreached}")
    if problems:
        pytest.fail(failure_text(report, problems), pytrace=False)
    print(f"chaos seed {SEED}: {report.tally}\n{report.figures}")
    shutil.rmtree(workdir, ignore_errors=True)
