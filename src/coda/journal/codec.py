"""The stored JSON form of events.

One event is one JSON object:

    {"v": 1, "type": "TaskCompleted", "run_id": "...", "seq": 7, "at": 1733300000.5,
     "attempt": 1, "step": 2, "try_number": 1, "result": {...}}

`v` is the version of this form. Readers accept every version up to
`FORMAT_VERSION` and refuse a newer one with a clear error instead of guessing.
Fields added in later versions have defaults, so an old object still loads; keys
a reader does not know are ignored. Values are read strictly: a field of the
wrong JSON type is a malformed event, never converted (a string `cache_key`
must not quietly become a list of its letters). The one conversion is an
integer where a float is expected (`"at": 10` is 10.0), as JSON does not tell
them apart. This same form is what `coda history --json` prints, one object a
line, and what the replay test helpers read back.

Writing goes the other way and checks nothing: the values inside an event
(arguments, results, cache keys) were checked by `coda.values` where they were
made, and whatever `orjson` cannot store (bytes, sets, non-string keys) makes
`encode` raise `TypeError` rather than be stored as something else.

How it is done
--------------
Every append encodes its events, every activation of a workflow decodes its
history and recovery decodes every unfinished run: the codec is on the hot path
of all three. So its functions are generated once, at import, for each event
class from its `attrs.fields`, much as attrs generates `__init__`: straight-line
code that builds an object's dict field by field, and that reads each field with
a single type test on the path where the field is right (`type(x) is not int`),
working out what is wrong only when it is. What each field may hold follows from
its annotation through `coda._strict.CHECKS`; a field of a type missing there
fails at import, so a new field cannot be read laxly by accident. On the 30,005 events
of the W5 benchmark's history, the generic structuring with cattrs that this
replaced decoded about 240,000 events a second, these readers about 600,000.

`ErrorInfo` and `RetryPolicy` objects are shared while decoding: every
TaskScheduled of a history carries one of the same few policies, and a frozen
object can be used by all of them. A shared object is equal to what decoding
would have built, field for field and type for type.
"""

from __future__ import annotations

import linecache
from collections.abc import Callable
from types import MemberDescriptorType
from typing import Any, Final, get_type_hints

import attrs
import cattrs
import orjson

from coda._strict import CHECKS, NAMESPACE, Malformed
from coda.errors import JournalError, JournalVersionError
from coda.journal.events import EVENT_TYPES, ErrorInfo, Event, RetryPolicy

__all__ = [
    "FORMAT_VERSION",
    "converter",
    "decode",
    "decode_dict",
    "encode",
    "encode_dict",
]

FORMAT_VERSION = 1

# Distinct shared objects kept per class (`ErrorInfo`, `RetryPolicy`); past
# this many the table starts again, so odd histories cannot make it grow.
_SHARED_MAX = 1024


# How a field is written, when not as it is: tuples as lists, so that a written
# dict reads back (a reader wants the JSON form, where a tuple is a list).
_WRITES: dict[Any, str] = {tuple[str, ...]: "list({v})"}

_Reader = Callable[[dict[str, Any]], Event]
_Writer = Callable[[Any], dict[str, Any]]

# Each nested class: the name of its generated reader and writer.
_NESTED: dict[type, str] = {ErrorInfo: "ErrorInfo", RetryPolicy: "RetryPolicy"}


def _generate(cls: type, source: str, namespace: dict[str, Any]) -> None:
    """Run generated `source` into `namespace`, findable by tracebacks."""
    filename = f"<coda.journal.codec {cls.__name__}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)


def _check(cls: type, field: attrs.Attribute[Any], path: str) -> str:
    """The line that checks (and converts) `x_<name>`, read for `field`."""
    kind = get_type_hints(cls)[field.name]
    x = f"x_{field.name}"
    if kind in _NESTED:
        return f"{x} = _read_{_NESTED[kind]}({x}, {path})"
    if kind in CHECKS:
        return CHECKS[kind].format(x=x, path=path)
    raise TypeError(
        f"coda.journal.codec cannot read {cls.__name__}.{field.name} of type "
        f"{kind!r}: give the type an entry in coda._strict.CHECKS"
    )


def _plain(cls: type) -> bool:
    """Whether an instance may be filled in slot by slot, without `__init__`.

    That halves the time it takes to make an event. It is only the same as
    calling the class when `__init__` does nothing but set each field.
    """
    fields = attrs.fields(cls)
    return (
        "__slots__" in cls.__dict__
        and not any(hasattr(cls, f"__attrs_{h}_init__") for h in ("pre", "post"))
        and all(f.init and f.validator is None and f.converter is None for f in fields)
        and all(isinstance(getattr(cls, f.name), MemberDescriptorType) for f in fields)
    )


def _reader_source(cls: type, where: str) -> tuple[str, str, dict[str, Any]]:
    """A reader of `cls` objects in two parts, and the constants they need.

    The first part reads and checks every field into `x_<name>`, the second
    makes the instance `made` from them.

    `where` is the expression of a field's location, given the expression of
    its name: `'$.' + {name}` for an event's own fields, `where + '.' + {name}`
    inside one.
    Required fields are taken by subscript, the quickest read there is; a
    missing one raises `KeyError`, which names it.
    """
    fields = attrs.fields(cls)
    required = [f for f in fields if f.default is attrs.NOTHING]
    defaulted = [f for f in fields if f.default is not attrs.NOTHING]
    constants: dict[str, Any] = {"_cls": cls}
    lines = []
    if required:
        lines.append("try:")
        lines += [f"    x_{f.name} = obj[{f.name!r}]" for f in required]
        lines.append("except KeyError as missing:")
        path = where.format(name="missing.args[0]")
        lines.append(f"    raise _problem({path}, '', _MISSING) from None")
    lines += [_check(cls, f, where.format(name=repr(f.name))) for f in required]
    for f in defaulted:
        if isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            constants[f"_factory_{f.name}"] = f.default.factory
            fill = f"_factory_{f.name}()"
        else:
            constants[f"_default_{f.name}"] = f.default
            fill = f"_default_{f.name}"
        x = f"x_{f.name}"
        lines += [
            f"{x} = obj.get({f.name!r}, _MISSING)",
            f"if {x} is _MISSING: {x} = {fill}",
            "else:",
            "    " + _check(cls, f, where.format(name=repr(f.name))),
        ]
    make = []
    if _plain(cls):
        make.append("made = _new(_cls)")
        for f in fields:
            constants[f"_set_{f.name}"] = getattr(cls, f.name).__set__
            make.append(f"_set_{f.name}(made, x_{f.name})")
    else:
        arguments = ", ".join(f"{f.alias}=x_{f.name}" for f in fields)
        make.append(f"made = _cls({arguments})")
    return _indent(lines), _indent(make), constants


def _indent(lines: list[str], by: str = "    ") -> str:
    return "".join(f"{by}{line}\n" for line in lines)


def _writer_source(cls: type, head: str) -> str:
    hints = get_type_hints(cls)
    items = [head] if head else []
    for field in attrs.fields(cls):
        kind, value = hints[field.name], f"e.{field.name}"
        if kind in _NESTED:
            value = f"_write_{_NESTED[kind]}({value})"
        elif kind in _WRITES:
            value = _WRITES[kind].format(v=value)
        items.append(f"{field.name!r}: {value}")
    body = ",\n        ".join(items)
    return f"def write(e):\n    return {{\n        {body},\n    }}\n"


def _make_nested(cls: type, namespace: dict[str, Any]) -> None:
    """The reader and writer of `ErrorInfo` or `RetryPolicy`, into `namespace`.

    The reader takes the object and the path of the field holding it, and
    returns a shared instance when an equal one was read before. A float field
    equal to zero is the exception: -0.0 == 0.0, and the sign must survive.
    """
    name = _NESTED[cls]
    reads, make, constants = _reader_source(cls, "where + '.' + {name}")
    fields = attrs.fields(cls)
    hints = get_type_hints(cls)
    nonzero = " and ".join(f"x_{f.name}" for f in fields if hints[f.name] is float)
    source = (
        "def read(obj, where):\n"
        "    if type(obj) is not dict: raise _problem(where, 'an object', obj)\n"
        f"{reads}"
        f"    key = ({', '.join(f'x_{f.name}' for f in fields)},)\n"
        "    found = _shared.get(key)\n"
        "    if found is not None: return found\n"
        f"{make}"
        f"    if {nonzero or 'True'}:\n"
        "        if len(_shared) >= _SHARED_MAX: _shared.clear()\n"
        "        _shared[key] = made\n"
        "    return made\n"
    )
    local = {**namespace, **constants, "_shared": {}}
    _generate(cls, source + _writer_source(cls, ""), local)
    namespace[f"_read_{name}"] = local["read"]
    namespace[f"_write_{name}"] = local["write"]


def _make_event(cls: type[Event], namespace: dict[str, Any]) -> tuple[_Reader, _Writer]:
    reads, make, constants = _reader_source(cls, "'$.' + {name}")
    source = f"def read(obj):\n{reads}{make}    return made\n"
    head = f"'v': {FORMAT_VERSION}, 'type': {cls.__name__!r}"
    local = {**namespace, **constants}
    _generate(cls, source + _writer_source(cls, head), local)
    return local["read"], local["write"]


def _make_all() -> tuple[dict[str, _Reader], dict[type, _Writer]]:
    namespace: dict[str, Any] = {
        **NAMESPACE,
        "_SHARED_MAX": _SHARED_MAX,
        "_new": object.__new__,
    }
    for nested in _NESTED:
        _make_nested(nested, namespace)
    readers: dict[str, _Reader] = {}
    writers: dict[type, _Writer] = {}
    for name, cls in EVENT_TYPES.items():
        readers[name], writers[cls] = _make_event(cls, namespace)
    return readers, writers


_READERS, _WRITERS = _make_all()


def _hook(read: _Reader) -> Callable[[Any, Any], Event]:
    """A cattrs structure hook (value, class) around a generated reader."""

    def structure(obj: Any, _cls: Any) -> Event:
        return read(obj)

    return structure


def _make_converter() -> cattrs.Converter:
    """The cattrs converter of events, with the generated functions as its hooks.

    cattrs does the dispatching, by class, for this module and for anyone who
    wants to (un)structure events with cattrs; the work itself is done by the
    generated readers and writers, which are strict where cattrs' generic
    structuring converts, and several times faster.
    """
    converter = cattrs.Converter()
    for name, cls in EVENT_TYPES.items():
        converter.register_structure_hook(cls, _hook(_READERS[name]))
        converter.register_unstructure_hook(cls, _WRITERS[cls])
    return converter


converter: Final = _make_converter()


def encode_dict(event: Event) -> dict[str, Any]:
    """The JSON object of `event`, with its version and type tag.

    The values inside (arguments, results) are the event's own, not copies.
    """
    # The writers are looked up here rather than through `converter`: every
    # append encodes each of its events, and cattrs' dispatch cost more than
    # a third of what the writer itself does.
    write = _WRITERS.get(type(event))
    if write is None:
        raise TypeError(f"{type(event).__qualname__} is not an event type of Coda")
    return write(event)


def encode(event: Event) -> bytes:
    return orjson.dumps(encode_dict(event))


def decode_dict(obj: dict[str, Any]) -> Event:
    """Rebuild an event from its JSON object; refuse unknown versions and types."""
    version = obj.get("v")
    kind = obj.get("type")
    if type(version) is not int or version < 1 or not isinstance(kind, str):
        raise JournalError(
            f"not a Coda event (no version 'v' >= 1 and string 'type'): {_preview(obj)}"
        )
    if version > FORMAT_VERSION:
        raise JournalVersionError(
            f"event format v{version} is newer than this Coda understands "
            f"(v{FORMAT_VERSION}); upgrade Coda to read it"
        )
    # The reader is looked up here rather than through `converter`, as in
    # `encode_dict`: replaying a long history decodes every event of it.
    read = _READERS.get(kind)
    if read is None:
        raise JournalVersionError(
            f"unknown event type {kind!r}: written by a newer Coda? upgrade to read it"
        )
    try:
        event: Event = read(obj)
    except Malformed as exc:
        raise JournalError(f"malformed {kind} event {_preview(obj)}: {exc}") from None
    return event


def decode(data: bytes | str) -> Event:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JournalError(f"event is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise JournalError(f"event is not a JSON object: {_preview(obj)}")
    return decode_dict(obj)


def _preview(obj: object, limit: int = 200) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."
