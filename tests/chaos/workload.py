"""The chaos workload: which runs to submit, generated from a seed.

Run ids are explicit (`c<seed>-<n>-<workflow>`), so a client that did not hear
back from the supervisor can submit again with the same id: the same id is the
same run. The arguments a run gets are its spec plus where to leave its traces
(`args_for`), so the crash-free reference can run the very same specs with
traces of its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Workflow, weight.
KINDS = (
    ("sequence", 25),
    ("fanout", 20),
    ("flaky_steps", 20),
    ("second_attempt", 17),
    ("slow", 10),
    ("doomed_run", 8),
)


@dataclass(frozen=True)
class Submission:
    run_id: str
    workflow: str
    spec: dict[str, Any]
    # Seconds after its submission is acknowledged to cancel it; None: never.
    cancel_after: float | None = None


def make_workload(seed: int, runs: int, delay: float = 0.01) -> list[Submission]:
    rng = random.Random(f"chaos-workload-{seed}")
    names = [name for name, _ in KINDS]
    weights = [weight for _, weight in KINDS]
    out = []
    for index in range(runs):
        workflow = rng.choices(names, weights)[0]
        spec: dict[str, Any] = {
            "seed": rng.randrange(100_000),
            "delay": round(rng.uniform(0.0, delay), 4),
        }
        cancel_after = None
        if workflow == "sequence":
            spec["length"] = rng.randint(2, 6)
        elif workflow == "fanout":
            spec["width"] = rng.randint(2, 6)
        elif workflow == "flaky_steps":
            spec["fail_first"] = rng.randint(0, 2)
        elif workflow == "slow":
            spec["length"] = 6
            spec["delay"] = 0.05
            if rng.random() < 0.6:
                cancel_after = round(rng.uniform(0.0, 0.4), 3)
        out.append(
            Submission(f"c{seed}-{index:04d}-{workflow}", workflow, spec, cancel_after)
        )
    return out


def args_for(submission: Submission, side: Path, counters: Path) -> dict[str, Any]:
    return {"side": str(side), "counters": str(counters), **submission.spec}
