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

import math
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


# What `RetryPolicy.__new__` holds for a field not given: the default, unchecked.
_UNSET: Any = object()

# The largest integer the journal's JSON encoder (orjson) writes; and the
# largest a float field may be given as an int, as its reader makes a float of
# it: 2**53 + 1 would be read back as 2**53.
_INT_MAX = 2**64 - 1
_EXACT_FLOAT_MAX = 2**53


@attrs.frozen
class RetryPolicy:
    """When a failed task try, or a failed workflow attempt, is tried again.

    `max_retries` counts retries after the first try. A failure is retried only if
    its type is one of `retry_on` (qualified names, subclasses included). The
    n-th retry waits `backoff * backoff_factor ** (n - 1)` seconds, at most
    `max_backoff`. A lost worker is always retried, up to `max_lost_workers`
    times, whatever `retry_on` says: losing the process is not the task's fault
    until it happens again and again.

    A policy is checked when it is made: its counts are whole numbers >= 0 and
    its other numbers finite and >= 0, because it is journaled with every run
    and task that uses it, and JSON has no infinity or NaN (the encoder writes
    null, which no reader takes back).
    """

    max_retries: int = 0
    retry_on: tuple[str, ...] = ("Exception",)
    backoff: float = 1.0
    backoff_factor: float = 2.0
    max_backoff: float = 60.0
    max_lost_workers: int = 2

    # Checked here rather than by attrs validators: the journal's readers fill
    # a policy in slot by slot (`object.__new__`, see `coda.journal.codec`),
    # which they do only for a class without validators, and they must go on
    # reading what is stored as it is, a policy journaled before these checks
    # included, instead of refusing the journal. The parameters are the
    # fields', in order. `quick` passes a right policy with every field given
    # at a glance: every task a worker spawns brings its policy across the
    # wire, where it is made again (`coda.runtime.wire`). Anything else is
    # looked at field by field, to say what is wrong.
    def __new__(
        cls,
        max_retries: Any = _UNSET,
        retry_on: Any = _UNSET,
        backoff: Any = _UNSET,
        backoff_factor: Any = _UNSET,
        max_backoff: Any = _UNSET,
        max_lost_workers: Any = _UNSET,
    ) -> RetryPolicy:
        quick = (
            type(max_retries) is int
            and 0 <= max_retries <= _INT_MAX
            and type(max_lost_workers) is int
            and 0 <= max_lost_workers <= _INT_MAX
            and type(backoff) is float
            and 0.0 <= backoff < math.inf
            and type(backoff_factor) is float
            and 0.0 <= backoff_factor < math.inf
            and type(max_backoff) is float
            and 0.0 <= max_backoff < math.inf
            and type(retry_on) is tuple
        )
        if quick:
            try:
                "".join(retry_on)  # the quickest test that every name is a str
            except TypeError:
                quick = False
        if not quick:
            given = {
                "max_retries": max_retries,
                "retry_on": retry_on,
                "backoff": backoff,
                "backoff_factor": backoff_factor,
                "max_backoff": max_backoff,
                "max_lost_workers": max_lost_workers,
            }
            _check_policy({k: v for k, v in given.items() if v is not _UNSET})
        return object.__new__(cls)

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retry number `retry_number` (1-based)."""
        try:
            raw = self.backoff * float(self.backoff_factor) ** max(retry_number - 1, 0)
        except OverflowError:
            # A float power past the largest float raises instead of giving
            # infinity: the 1,025th retry of a policy that doubles, say.
            raw = math.inf if self.backoff else 0.0
        return float(min(raw, self.max_backoff))


_POLICY_NUMBERS = {
    "max_retries": "a whole number >= 0",
    "max_lost_workers": "a whole number >= 0",
    "backoff": "a finite number of seconds >= 0",
    "backoff_factor": "a finite number >= 0",
    "max_backoff": "a finite number of seconds >= 0; for no cap, use a large number",
}


def _check_policy(given: dict[str, Any]) -> None:
    for name, value in given.items():
        if name != "retry_on":
            whole = name in ("max_retries", "max_lost_workers")
            check_number(name, value, _POLICY_NUMBERS[name], whole=whole)
        elif type(value) is not tuple or not all(isinstance(n, str) for n in value):
            raise TypeError(
                f"retry_on={value!r}: a tuple of qualified class names, such as "
                "('OSError', 'app.errors.Busy')"
            )


def check_number(
    name: str,
    value: object,
    allowed: str,
    *,
    whole: bool = False,
    above_zero: bool = False,
) -> None:
    """Refuse a declared number the journal could not store and read back as it
    is, or that means nothing as a count or a time: `allowed` says what may be
    given instead.

    A bool is refused although it is an int: `max_retries=True` is a mistake.
    So is a subclass of float, which the JSON encoder refuses to write.
    """
    number: float
    if type(value) is float and not whole:
        number = value
    elif isinstance(value, int) and not isinstance(value, bool):
        if value > (_INT_MAX if whole else _EXACT_FLOAT_MAX):
            most = "2**64 - 1" if whole else "2**53 as an int (or pass a float)"
            raise ValueError(f"{name}={value}: {allowed}, up to {most}")
        number = value
    else:
        raise TypeError(f"{name}={value!r}: {allowed}, not a {type(value).__name__}")
    # NaN compares false to everything, so it fails the first test.
    if not (number > 0 if above_zero else number >= 0) or number == math.inf:
        raise ValueError(f"{name}={value!r}: {allowed}")


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
