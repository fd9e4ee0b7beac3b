"""The messages the runtime's processes exchange, over `coda.protocol` frames.

Supervisor to worker:
    {"op": "activate", "run": id, "workflow": name, "args": {...},
     "full": bool, "events": [event, ...]}   feed a run's workflow instance
    {"op": "drop", "run": id}                forget a run's instance
    {"op": "task", "run": id, "attempt": a, "step": s, "try": t,
     "task": name, "args": {...}}            run one try of a task
    {"op": "stop"}                           finish up and exit

Worker to supervisor:
    {"op": "commands", "run": id, "commands": [command, ...]}
    {"op": "diverged", "run": id, "error": error}
    {"op": "outcome", "run": id, "attempt": a, "step": s, "try": t,
     "ok": bool, "result": value | "error": error}

Events travel in their journal form (`coda.journal.codec`); commands in the
form below. Both are plain JSON, so a bad peer can at worst send a bad value,
which the receiver refuses with a clear error.
"""

from __future__ import annotations

from typing import Any

import cattrs
from cattrs.preconf.orjson import make_converter

from coda.errors import ProtocolError
from coda.journal.events import ErrorInfo
from coda.replay.engine import (
    Command,
    CompleteRun,
    FailAttempt,
    RecordSideEffect,
    ReuseResult,
    ScheduleTask,
)

__all__ = [
    "WORKER_LINK_MAX_FRAME_BYTES",
    "decode_command",
    "decode_error",
    "encode_command",
    "encode_error",
]

# An activation carries a run's whole history, and each value in it may be as
# large as the value limit (16 MiB by default): the link to a worker allows far
# more than a client's connection. A history larger still cannot be hosted, and
# its run is parked with that reason.
WORKER_LINK_MAX_FRAME_BYTES = 1024 * 1024 * 1024

_converter = make_converter()
_COMMANDS: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (ScheduleTask, ReuseResult, RecordSideEffect, CompleteRun, FailAttempt)
}


def encode_command(command: Command) -> dict[str, Any]:
    body: dict[str, Any] = _converter.unstructure(command)
    body["type"] = type(command).__name__
    return body


def decode_command(obj: Any) -> Command:
    kind = obj.get("type") if isinstance(obj, dict) else None
    cls = _COMMANDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"not a command: {str(obj)[:200]}")
    try:
        command: Command = _converter.structure(obj, cls)
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {cls.__name__} command: {exc}") from exc
    return command


def encode_error(error: ErrorInfo) -> dict[str, Any]:
    body: dict[str, Any] = _converter.unstructure(error)
    return body


def decode_error(obj: Any) -> ErrorInfo:
    try:
        error: ErrorInfo = _converter.structure(obj, ErrorInfo)
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed error description: {exc}") from exc
    return error
