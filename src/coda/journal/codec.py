"""The stored JSON form of events.

One event is one JSON object:

    {"v": 1, "type": "TaskCompleted", "run_id": "...", "seq": 7, "at": 1733300000.5,
     "attempt": 1, "step": 2, "try_number": 1, "result": {...}}

`v` is the version of this form. Readers accept every version up to
`FORMAT_VERSION` and refuse a newer one with a clear error instead of guessing.
Fields added in later versions have defaults, so an old object still loads; keys
a reader does not know are ignored. Values are read strictly: a field of the
wrong JSON type is a malformed event, never converted (a string `cache_key`
must not quietly become a list of its letters). This same form is what
`coda history --json` prints, one object a line, and what the replay test
helpers read back.
"""

from __future__ import annotations

from typing import Any, get_args, get_origin

import cattrs
import orjson
from cattrs.preconf.orjson import make_converter

from coda.errors import JournalError, JournalVersionError
from coda.journal.events import EVENT_TYPES, Event

__all__ = ["FORMAT_VERSION", "decode", "decode_dict", "encode", "encode_dict"]

FORMAT_VERSION = 1

_converter = make_converter()


# Strict structuring: cattrs would otherwise call int(), str(), list() and
# tuple() on whatever it finds, turning corruption into plausible events.


def _exact(kind: type, convert: type | None = None) -> Any:
    def structure(value: Any, _: Any) -> Any:
        ok = type(value) is kind or (kind is float and type(value) is int)
        if not ok:
            raise TypeError(f"expected {kind.__name__}, found {value!r}")
        return convert(value) if convert else value

    return structure


_converter.register_structure_hook(str, _exact(str))
_converter.register_structure_hook(int, _exact(int))
_converter.register_structure_hook(float, _exact(float, float))


def _structure_list(value: Any, cls: Any) -> Any:
    if type(value) is not list:
        raise TypeError(f"expected a list, found {value!r}")
    item = get_args(cls)[0]  # list[X] and tuple[X, ...] are the only kinds used
    items = [_converter.structure(v, item) for v in value]
    return tuple(items) if get_origin(cls) is tuple else items


def _structure_dict(value: Any, cls: Any) -> Any:
    if type(value) is not dict:
        raise TypeError(f"expected an object, found {value!r}")
    key_type, value_type = get_args(cls)
    return {
        _converter.structure(k, key_type): _converter.structure(v, value_type)
        for k, v in value.items()
    }


_converter.register_structure_hook_func(
    lambda cls: get_origin(cls) in (list, tuple), _structure_list
)
_converter.register_structure_hook_func(
    lambda cls: get_origin(cls) is dict, _structure_dict
)


def encode_dict(event: Event) -> dict[str, Any]:
    """The JSON object of `event`, with its version and type tag."""
    body: dict[str, Any] = _converter.unstructure(event)
    return {"v": FORMAT_VERSION, "type": type(event).__name__, **body}


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
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise JournalVersionError(
            f"unknown event type {kind!r}: written by a newer Coda? upgrade to read it"
        )
    try:
        return _converter.structure(obj, cls)
    except cattrs.BaseValidationError as exc:
        problems = "; ".join(cattrs.transform_error(exc))
        raise JournalError(
            f"malformed {kind} event {_preview(obj)}: {problems}"
        ) from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise JournalError(f"malformed {kind} event {_preview(obj)}: {exc}") from exc


def decode(data: bytes | str) -> Event:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JournalError(f"event is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise JournalError(f"event is not a JSON object: {_preview(obj)}")
    return decode_dict(obj)


def _preview(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."
