"""The messages the runtime's processes exchange, over `coda.protocol` frames.

Supervisor to worker:
    {"op": "activate", "run": id, "n": number, "workflow": name,
     "args": {...}, "full": bool, "events": [event, ...]}
                                             feed a run's workflow instance
    {"op": "drop", "run": id}                forget a run's instance
    {"op": "task", "run": id, "attempt": a, "step": s, "try": t,
     "task": name, "args": {...}}            run one try of a task
    {"op": "stop"}                           finish up and exit

Worker to supervisor:
    {"op": "commands", "run": id, "n": number, "commands": [command, ...]}
    {"op": "diverged", "run": id, "n": number, "error": error}
    {"op": "resync", "run": id, "n": number}
                                             answers to activation number n
    {"op": "outcome", "run": id, "attempt": a, "step": s, "try": t,
     "ok": bool, "result": value | "error": error}

Events travel in their journal form (`coda.journal.codec`); commands and
error descriptions in the form below: an object with a field for each attrs
field, nested objects for `RetryPolicy` and `ErrorInfo`, lists for tuples, and
a command's class name under "type". Both are plain JSON, so a bad peer can at
worst send a bad value, which the receiver refuses with a clear error.

How it is done
--------------
Every activation's answer is encoded by a worker and decoded by the
supervisor, so commands and errors get readers and writers generated once, at
import, from their `attrs.fields` (as `coda.journal.codec` does for events):
straight-line code with a single type test a field on the path where the field
is right. Reading is strict: a field of the wrong JSON type is a malformed
command, never converted (a string `cache_key` must not become a list of its
letters, nor 1.5 an attempt number 1); the one conversion is an integer where
a float is expected, as JSON does not tell them apart. Keys a reader does not
know are ignored, so "type" needs no special case. Writing checks nothing: the
values inside were checked where they were made. For W2's one-task run
(a ScheduleTask and a CompleteRun), writing takes 0.7 us instead of the 1.5 of
the cattrs converter this replaced, reading 3.6 us instead of 5.1.
"""

from __future__ import annotations

import linecache
from collections.abc import Callable
from typing import Any, Final, get_type_hints

import attrs

from coda.errors import ProtocolError
from coda.journal.events import ErrorInfo, RetryPolicy
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


# TODO: the helpers below and the reader generator after them repeat those of
# `coda.journal.codec` (whose errors name events, where these name commands).
# A module of their own, used by both, would leave one place to fix a bug in
# strict reading; until then a fix must be made in both files.


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()


class _Malformed(Exception):
    """A field that cannot be read; the caller names what it was reading."""


def _bad(path: str, expected: str, value: Any) -> _Malformed:
    if value is _MISSING:
        return _Malformed(f"required field missing @ {path}")
    text = repr(value)
    if len(text) > 60:
        text = text[:60] + "..."
    return _Malformed(f"invalid value, expected {expected}, found {text} @ {path}")


def _as_float(value: Any, path: str) -> float:
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            pass
    raise _bad(path, "float", value)


def _as_strings(value: Any, path: str) -> tuple[str, ...]:
    if type(value) is not list:
        raise _bad(path, "a list of str", value)
    for index, item in enumerate(value):
        if type(item) is not str:
            raise _bad(f"{path}[{index}]", "str", item)
    return tuple(value)


def _is_object(value: Any) -> bool:
    if type(value) is not dict:
        return False
    for key in value:  # noqa: SIM110 (a loop is quicker than all() of a generator)
        if type(key) is not str:
            return False
    return True


# How a field of each annotated type is read: `{x}` holds the value (or
# `_MISSING`), `{path}` is the expression naming it in errors. A type missing
# here fails at import, so that a new field cannot be read laxly by accident.
_READS: dict[Any, str] = {
    int: "if type({x}) is not int: raise _bad({path}, 'int', {x})",
    str: "if type({x}) is not str: raise _bad({path}, 'str', {x})",
    float | None: (
        "if type({x}) is not float and {x} is not None: {x} = _as_float({x}, {path})"
    ),
    float: "if type({x}) is not float: {x} = _as_float({x}, {path})",
    Any: "if {x} is _MISSING: raise _bad({path}, 'a value', {x})",
    dict[str, Any]: "if not _is_object({x}): raise _bad({path}, 'an object', {x})",
    list[Any]: "if type({x}) is not list: raise _bad({path}, 'a list', {x})",
    list[Any] | None: (
        "if type({x}) is not list and {x} is not None:"
        " raise _bad({path}, 'a list or null', {x})"
    ),
    tuple[str, ...]: "{x} = _as_strings({x}, {path})",
    RetryPolicy: "{x} = _read_RetryPolicy({x}, {path})",
    ErrorInfo: "{x} = _read_ErrorInfo({x}, {path})",
}

# How a field is written, when not as it is.
_WRITES: dict[Any, str] = {
    tuple[str, ...]: "list({v})",
    RetryPolicy: "_write_RetryPolicy({v})",
    ErrorInfo: "_write_ErrorInfo({v})",
}


def _source(cls: type, tag: str | None) -> str:
    """`read(obj, where)` and `write(value)` for `cls`, as Python source.

    `tag` is the "type" a written object carries, if any.
    """
    hints = get_type_hints(cls)
    reads = [
        "def read(obj, where):",
        "    if type(obj) is not dict: raise _bad(where, 'an object', obj)",
    ]
    items = []
    for field in attrs.fields(cls):
        kind, x = hints[field.name], f"x_{field.name}"
        if kind not in _READS or isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            raise TypeError(
                f"coda.runtime.wire cannot read {cls.__name__}.{field.name} of type "
                f"{kind!r}: give the type an entry in _READS"
            )
        check = _READS[kind].format(x=x, path=f"where + '.{field.name}'")
        reads.append(f"    {x} = obj.get({field.name!r}, _MISSING)")
        if field.default is attrs.NOTHING:
            reads.append(f"    {check}")
        else:
            # A default is a valid value as it is (a tuple, not a list).
            reads.append(f"    if {x} is _MISSING: {x} = _default_{field.name}")
            reads += ["    else:", f"        {check}"]
        value = _WRITES.get(kind, "{v}").format(v=f"c.{field.name}")
        items.append(f"{field.name!r}: {value}")
    arguments = ", ".join(f"{f.alias}=x_{f.name}" for f in attrs.fields(cls))
    reads.append(f"    return _cls({arguments})")
    if tag is not None:
        assert "type" not in attrs.fields_dict(cls), "the tag would hide a field"
        items.append(f"'type': {tag!r}")
    writes = ["def write(c):", f"    return {{{', '.join(items)}}}"]
    return "\n".join(reads + writes) + "\n"


def _generate(cls: type, tag: str | None, namespace: dict[str, Any]) -> None:
    """Define `_read_<Class>` and `_write_<Class>` in `namespace`."""
    source = _source(cls, tag)
    filename = f"<coda.runtime.wire {cls.__name__}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    local = dict(namespace, _cls=cls)
    for field in attrs.fields(cls):
        local[f"_default_{field.name}"] = field.default
    exec(compile(source, filename, "exec"), local)
    namespace[f"_read_{cls.__name__}"] = local["read"]
    namespace[f"_write_{cls.__name__}"] = local["write"]


_CODE: dict[str, Any] = {
    "_MISSING": _MISSING,
    "_as_float": _as_float,
    "_as_strings": _as_strings,
    "_bad": _bad,
    "_is_object": _is_object,
}
_generate(RetryPolicy, None, _CODE)
_generate(ErrorInfo, None, _CODE)
_READERS: dict[str, Callable[[Any, str], Command]] = {}
_WRITERS: dict[type, Callable[[Command], dict[str, Any]]] = {}
for _cls in (ScheduleTask, ReuseResult, RecordSideEffect, CompleteRun, FailAttempt):
    _generate(_cls, _cls.__name__, _CODE)
    _READERS[_cls.__name__] = _CODE[f"_read_{_cls.__name__}"]
    _WRITERS[_cls] = _CODE[f"_write_{_cls.__name__}"]
_read_error: Callable[[Any, str], ErrorInfo] = _CODE["_read_ErrorInfo"]
_write_error: Callable[[ErrorInfo], dict[str, Any]] = _CODE["_write_ErrorInfo"]


def encode_command(command: Command) -> dict[str, Any]:
    return _WRITERS[type(command)](command)


def decode_command(obj: Any) -> Command:
    kind = obj.get("type") if isinstance(obj, dict) else None
    read = _READERS.get(kind) if isinstance(kind, str) else None
    if read is None:
        raise ProtocolError(f"not a command: {str(obj)[:200]}")
    try:
        return read(obj, "$")
    except _Malformed as exc:
        raise ProtocolError(f"malformed {kind} command: {exc}") from None


def encode_error(error: ErrorInfo) -> dict[str, Any]:
    return _write_error(error)


def decode_error(obj: Any) -> ErrorInfo:
    try:
        return _read_error(obj, "$")
    except _Malformed as exc:
        raise ProtocolError(f"malformed error description: {exc}") from None
