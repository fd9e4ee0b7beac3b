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
# Each sits where dying changes what survives:
POINTS = frozenset(
    {
        # Around each journal append: nothing of it written, or all of it.
        "supervisor.before_commit",
        "supervisor.after_commit",
        # Tries handed to workers (their starts durable), outcomes not back.
        "supervisor.after_dispatch",
        # A worker's outcome received and not yet committed: it is lost, the
        # try runs again.
        "supervisor.outcome_received",
        # A client's request done (its events durable) and its reply not sent
        # yet, or just sent: the client must be able to ask again, idempotently.
        "supervisor.before_ack",
        "supervisor.after_ack",
        # SIGINT or SIGTERM received: dying instead of stopping cleanly.
        "supervisor.shutdown",
        # A try received and not started; its task body returned and its
        # outcome not sent; its outcome sent.
        "worker.task_received",
        "worker.task_returned",
        "worker.outcome_sent",
        # A workflow activation received; its commands sent.
        "worker.activation",
        "worker.commands_sent",
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
