"""The messages the runtime's processes exchange, over `coda.protocol` frames.

Supervisor to worker:
    {"op": "activate", "run": id, "n": number, "full": bool,
     "events": [event, ...], "workflow": name, "args": {...}}
                                             feed a run's workflow instance
                                             (workflow and args only when
                                             full: the whole history, for a
                                             new instance)
    {"op": "drop", "run": id}                forget a run's instance
    {"op": "task", "run": id, "attempt": a, "step": s, "try": t,
     "task": name, "args": {...}}            run one try of a task
    {"op": "cancel", "run": id}              the run ended: cancel its tries
    {"op": "cancel", "run": id, "try": [a, s, t]}
                                             cancel that one try
    {"op": "stop"}                           finish up and exit

Worker to supervisor:
    {"op": "commands", "run": id, "n": number, "commands": [command, ...],
     "finished": true (only when the run ended or its code returned, and
     the worker let the instance go)}
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
is right, from the same checks as events' (`coda._strict`). Reading is
strict: a field of the wrong JSON type is a malformed command, never converted
(a string `cache_key` must not become a list of its letters, nor 1.5 an
attempt number 1); the one conversion is an integer where a float is
expected, as JSON does not tell them apart. Keys a reader does not know are
ignored, so "type" needs no special case. Writing checks nothing: the values
inside were checked where they were made.

A worker sends the values in its answers (a task's result, a command's
arguments, result or recorded value) as raw values of the frame (see
`coda.protocol`, "Raw values"), which the supervisor reads as
`orjson.Fragment`: a command's reader takes a fragment wherever it takes a
value, and `encode_commands` says where each is. For W2's one-task run (a
ScheduleTask and a CompleteRun), writing takes 0.7 us instead of the 1.5 of
the cattrs converter this replaced, reading 3.6 us instead of 5.1.
"""

from __future__ import annotations

import linecache
from collections.abc import Callable
from typing import Any, get_type_hints

import attrs
import orjson

from coda._strict import CHECKS, NAMESPACE, Malformed
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
    "encode_commands",
    "encode_error",
    "raw_value",
]

# An activation carries a run's whole history, and each value in it may be as
# large as the value limit (16 MiB by default): the link to a worker allows far
# more than a client's connection. A history larger still cannot be hosted, and
# its run is parked with that reason.
WORKER_LINK_MAX_FRAME_BYTES = 1024 * 1024 * 1024


# How a field of each annotated type is read (see `coda._strict`): the plain
# types as events read them, the nested classes by their own reader.
_READS: dict[Any, str] = {
    **CHECKS,
    # Arguments that came as a raw value of the frame are a fragment.
    dict[str, Any]: (
        "if type({x}) is not _Fragment and not _is_object({x}):"
        " raise _problem({path}, 'an object', {x})"
    ),
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
        "    if type(obj) is not dict: raise _problem(where, 'an object', obj)",
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


_CODE: dict[str, Any] = dict(NAMESPACE, _Fragment=orjson.Fragment)
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


# The field of each command that holds a value of the workflow's.
_VALUE_FIELDS: dict[type, str] = {
    ScheduleTask: "args",
    ReuseResult: "result",
    RecordSideEffect: "value",
    CompleteRun: "result",
}

RawValues = list[tuple[list[str | int], bytes]]
"""A message's raw values: where each goes, and its JSON (`coda.protocol.RAW`)."""


def encode_commands(commands: list[Command]) -> tuple[list[dict[str, Any]], RawValues]:
    """Commands for an answer, their values apart as raw values of the frame."""
    encoded: list[dict[str, Any]] = []
    raw: RawValues = []
    for number, command in enumerate(commands):
        obj = encode_command(command)
        field = _VALUE_FIELDS.get(type(command))
        if field is not None:
            raw.append((["commands", number, field], orjson.dumps(obj.pop(field))))
        encoded.append(obj)
    return encoded, raw


def raw_value(path: list[str | int], encoded: bytes) -> RawValues:
    """One value, already encoded, to send as a raw value of the frame at `path`."""
    return [(path, encoded)]


def decode_command(obj: Any) -> Command:
    kind = obj.get("type") if isinstance(obj, dict) else None
    read = _READERS.get(kind) if isinstance(kind, str) else None
    if read is None:
        raise ProtocolError(f"not a command: {str(obj)[:200]}")
    try:
        return read(obj, "$")
    except Malformed as exc:
        raise ProtocolError(f"malformed {kind} command: {exc}") from None


def encode_error(error: ErrorInfo) -> dict[str, Any]:
    return _write_error(error)


def decode_error(obj: Any) -> ErrorInfo:
    try:
        return _read_error(obj, "$")
    except Malformed as exc:
        raise ProtocolError(f"malformed error description: {exc}") from None
