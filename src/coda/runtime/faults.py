"""Named crash points, for proving that a crash anywhere loses nothing.

A test arms points through the environment of the process it starts:

    CODA_CRASH="supervisor.after_commit:3,worker.task_returned:1"

makes that process `os._exit(CRASH_EXIT_CODE)` the third time it passes
`supervisor.after_commit` and the first time it passes `worker.task_returned`.
Disarmed (the variable unset), `crash_point` is a test of one global flag.
"""

from __future__ import annotations

import os
import sys

__all__ = ["CRASH_EXIT_CODE", "POINTS", "crash_point"]

CRASH_EXIT_CODE = 86

# Every point, so that a chaos test can cover them all and a typo fails loudly.
POINTS = frozenset(
    {
        "supervisor.before_commit",
        "supervisor.after_commit",
        "supervisor.after_dispatch",
        "supervisor.after_submit_ack",
        "supervisor.shutdown",
        "worker.task_received",
        "worker.task_returned",
        "worker.activation",
    }
)


def _parse(spec: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition(":")
        if name not in POINTS:
            raise ValueError(f"CODA_CRASH names unknown crash point {name!r}")
        armed[name] = int(count or "1")
    return armed


_armed = _parse(os.environ.get("CODA_CRASH", ""))
_ARMED = bool(_armed)


def crash_point(name: str) -> None:
    if not _ARMED:
        return
    left = _armed.get(name)
    if left is None:
        return
    if left <= 1:
        sys.stderr.write(f"coda: crash point {name} reached; exiting\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT_CODE)
    _armed[name] = left - 1
