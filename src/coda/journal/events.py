"""Events: the facts a run's history is made of.

Every change to a run is one of these, appended to the journal before anyone
acts on it. An event carries its run, its position `seq` in that run's history
(0, 1, 2, ... without gaps) and the time `at` it was recorded (Unix seconds).

Steps. Within an attempt, the workflow code produces steps in a deterministic
order, numbered from 0: each spawned task is one step, and so is each recorded
side effect (`now()`, `uuid4()`, `random()`). `(attempt, step)` names a step
everywhere: in events, commands and state.

Tries. A task step may run several times (retries, lost workers); each run is a
try, numbered from 1.

The classes are frozen attrs classes; `coda.journal.codec` turns them into the
versioned JSON form stored in the journal. To keep old journals loadable, a
field added later must have a default, and a class is never renamed or removed.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import attrs

__all__ = [
    "EVENT_TYPES",
    "AttemptFailed",
    "AttemptStarted",
    "ErrorInfo",
    "Event",
    "RetryPolicy",
    "RunCancelled",
    "RunCompleted",
    "RunFailed",
    "RunParked",
    "RunResumed",
    "RunRetried",
    "RunSubmitted",
    "SideEffectRecorded",
    "StepEvent",
    "TaskCompleted",
    "TaskFailed",
    "TaskReused",
    "TaskScheduled",
    "TaskStarted",
]

JSON: TypeAlias = Any


@attrs.frozen
class ErrorInfo:
    """An exception described so that it can cross processes and be stored.

    `types` lists the qualified names of the exception's classes, most derived
    first, so that `retry_on=[OSError]` matches a `ConnectionRefusedError` in a
    process that never imports the task's code.
    """

    type: str
    message: str
    traceback: str = ""
    types: tuple[str, ...] = ()

    # An exception's text is the task's to choose, and it is stored in the
    # journal, sent to clients and printed: a message of 20 MB (a whole file in
    # a ValueError, say) would be written several times over and stall every
    # request about its run. Past these bounds the middle is cut out, keeping
    # the start of a message and both ends of a traceback (where it began, and
    # the frames and exception line at its end).
    MAX_MESSAGE_CHARS = 64 * 1024
    MAX_TRACEBACK_CHARS = 256 * 1024

    @classmethod
    def from_exception(cls, exc: BaseException, traceback: str = "") -> ErrorInfo:
        types = tuple(_qualname(k) for k in type(exc).__mro__ if k is not object)
        message = _bounded(_unicode(str(exc)), cls.MAX_MESSAGE_CHARS, keep_end=False)
        return cls(
            type=types[0],
            message=message,
            traceback=_bounded(
                _unicode(traceback), cls.MAX_TRACEBACK_CHARS, keep_end=True
            ),
            types=types,
        )

    def is_a(self, qualified_names: tuple[str, ...]) -> bool:
        own = self.types or (self.type,)
        return any(name in own for name in qualified_names)


def _unicode(text: str) -> str:
    """`text` with any lone surrogate written as its escape (`\\udce9`).

    A message made from a file name that was not UTF-8 (`os.listdir`,
    `os.fsdecode`) holds lone surrogates, which no JSON encoder can write:
    the error would not reach the journal, and the failure would be lost
    (a worker could not even report it). The escape keeps what the byte was.
    """
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bounded(text: str, limit: int, *, keep_end: bool) -> str:
    """`text`, or its start (and end) with a note of what was cut, in `limit`."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    note = f"\n[... {cut:,} characters cut: the text was {len(text):,} long ...]\n"
    if not keep_end:
        return text[:limit] + note
    half = limit // 2
    return text[:half] + note + text[-half:]


def _qualname(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def qualified_name(cls: type) -> str:
    """The name under which a class is matched in `retry_on`: `OSError`, `a.b.C`."""
    return _qualname(cls)


@attrs.frozen
class RetryPolicy:
    """When a failed task try, or a failed workflow attempt, is tried again.

    `max_retries` counts retries after the first try. A failure is retried only if
    its type is one of `retry_on` (qualified names, subclasses included). The
    n-th retry waits `backoff * backoff_factor ** (n - 1)` seconds, at most
    `max_backoff`. A lost worker is always retried, up to `max_lost_workers`
    times, whatever `retry_on` says: losing the process is not the task's fault
    until it happens again and again.
    """

    max_retries: int = 0
    retry_on: tuple[str, ...] = ("Exception",)
    backoff: float = 1.0
    backoff_factor: float = 2.0
    max_backoff: float = 60.0
    max_lost_workers: int = 2

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retry number `retry_number` (1-based)."""
        raw = self.backoff * self.backoff_factor ** max(retry_number - 1, 0)
        return float(min(raw, self.max_backoff))


@attrs.frozen(kw_only=True)
class Event:
    run_id: str
    seq: int
    at: float


@attrs.frozen(kw_only=True)
class RunSubmitted(Event):
    """A client asked for a run of `workflow` with `args`."""

    workflow: str
    args: dict[str, JSON]
    policy: RetryPolicy = RetryPolicy()


@attrs.frozen(kw_only=True)
class AttemptStarted(Event):
    attempt: int


@attrs.frozen(kw_only=True)
class AttemptFailed(Event):
    """The workflow function raised. `retry_at` is set when another attempt follows."""

    attempt: int
    error: ErrorInfo
    retry_at: float | None = None


@attrs.frozen(kw_only=True)
class RunCompleted(Event):
    attempt: int
    result: JSON


@attrs.frozen(kw_only=True)
class RunFailed(Event):
    error: ErrorInfo


@attrs.frozen(kw_only=True)
class RunCancelled(Event):
    reason: str = ""


@attrs.frozen(kw_only=True)
class RunParked(Event):
    """The code no longer matches the history; the run waits for fixed code."""

    attempt: int
    error: ErrorInfo


@attrs.frozen(kw_only=True)
class RunResumed(Event):
    """A parked run is activated again, on the code deployed now."""

    reason: str = ""


@attrs.frozen(kw_only=True)
class RunRetried(Event):
    """A failed or cancelled run is reopened; a new attempt follows."""

    reason: str = ""


@attrs.frozen(kw_only=True)
class StepEvent(Event):
    attempt: int
    step: int


@attrs.frozen(kw_only=True)
class TaskScheduled(StepEvent):
    task: str
    args: dict[str, JSON]
    cache_key: list[JSON] | None = None
    policy: RetryPolicy = RetryPolicy()
    timeout: float | None = None


@attrs.frozen(kw_only=True)
class TaskStarted(StepEvent):
    try_number: int
    worker: str = ""


@attrs.frozen(kw_only=True)
class TaskCompleted(StepEvent):
    """A try succeeded. `cache_key` repeats the step's key for the cache projection."""

    try_number: int
    result: JSON
    cache_key: list[JSON] | None = None


@attrs.frozen(kw_only=True)
class TaskFailed(StepEvent):
    """A try failed. With `retry_at` another try follows; without, the step failed."""

    try_number: int
    error: ErrorInfo
    retry_at: float | None = None


@attrs.frozen(kw_only=True)
class TaskReused(StepEvent):
    """A new attempt found this step's `cache_key` done in an earlier attempt."""

    task: str
    cache_key: list[JSON]
    result: JSON
    from_attempt: int


@attrs.frozen(kw_only=True)
class SideEffectRecorded(StepEvent):
    """A value the workflow asked for that must not change on replay."""

    kind: str
    value: JSON


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        RunSubmitted,
        AttemptStarted,
        AttemptFailed,
        RunCompleted,
        RunFailed,
        RunCancelled,
        RunParked,
        RunResumed,
        RunRetried,
        TaskScheduled,
        TaskStarted,
        TaskCompleted,
        TaskFailed,
        TaskReused,
        SideEffectRecorded,
    )
}
