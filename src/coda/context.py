"""What workflow code can ask of Coda while it runs: `coda.context`.

Everything here is recorded in the run's history, so that a replay sees exactly
what the live run saw. Calling these outside workflow code raises `CodaError`.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import uuid as _uuid
from typing import Any

from coda.definitions import TaskDef
from coda.replay.engine import current_instance

__all__ = [
    "attempt",
    "is_replaying",
    "logger",
    "now",
    "random",
    "run_id",
    "spawn_task",
    "uuid4",
]


def spawn_task(
    task: TaskDef[..., Any],
    args: dict[str, Any] | None = None,
    cache_key: list[Any] | None = None,
) -> asyncio.Future[Any]:
    """Start `task` with keyword `args` as the workflow's next step.

    Returns a future: `await` it for the task's result (or a `TaskError`), or
    pass several to `asyncio.gather`. With a `cache_key` (a JSON list), a later
    attempt of this run reuses the result instead of running the task again.
    Arguments that are not JSON are refused here, before anything is recorded.
    """
    return current_instance().spawn_task(task, args or {}, cache_key)


def now() -> _dt.datetime:
    """The current time (UTC), recorded on first use and replayed after."""
    stamp = current_instance().side_effect("now", _fresh_now)
    return _dt.datetime.fromtimestamp(stamp, tz=_dt.UTC)


def uuid4() -> _uuid.UUID:
    """A random UUID, recorded on first use and replayed after."""
    instance = current_instance()
    return _uuid.UUID(instance.side_effect("uuid4", instance.side_effects.uuid4))


def random() -> float:
    """A random float in [0, 1), recorded on first use and replayed after."""
    instance = current_instance()
    value: float = instance.side_effect("random", instance.side_effects.random)
    return value


def run_id() -> str:
    return current_instance().run_id


def attempt() -> int:
    return current_instance().attempt


def is_replaying() -> bool:
    """True while the code is re-making steps its history already records."""
    return current_instance().replaying


def _fresh_now() -> float:
    return current_instance().side_effects.now()


class _WorkflowLogger(logging.LoggerAdapter[logging.Logger]):
    """Logs from workflow code once: quiet while the code replays its history."""

    def isEnabledFor(self, level: int) -> bool:
        try:
            if current_instance().replaying:
                return False
        except Exception:
            pass
        return self.logger.isEnabledFor(level)

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        try:
            instance = current_instance()
        except Exception:
            return msg, kwargs
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("run_id", instance.run_id)
        kwargs["extra"] = extra
        return f"[run {instance.run_id}] {msg}", kwargs


logger = _WorkflowLogger(logging.getLogger("coda.workflow"), {})
