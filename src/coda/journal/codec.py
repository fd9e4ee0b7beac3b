"""The stored JSON form of events.

One event is one JSON object:

    {"v": 1, "type": "TaskCompleted", "run_id": "...", "seq": 7, "at": 1733300000.5,
     "attempt": 1, "step": 2, "try_number": 1, "result": {...}}

`v` is the version of this form. Readers accept every version up to
`FORMAT_VERSION` and refuse a newer one with a clear error instead of guessing.
Fields added in later versions have defaults, so an old object still loads; keys
a reader does not know are ignored. This same form is what `coda history --json`
prints, one object a line, and what the replay test helpers read back.
"""

from __future__ import annotations

from typing import Any

import cattrs
import orjson
from cattrs.preconf.orjson import make_converter

from coda.errors import JournalError, JournalVersionError
from coda.journal.events import EVENT_TYPES, Event

__all__ = ["FORMAT_VERSION", "decode", "decode_dict", "encode", "encode_dict"]

FORMAT_VERSION = 1

_converter = make_converter()


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
    if not isinstance(version, int) or not isinstance(kind, str):
        raise JournalError(
            f"not a Coda event (no integer 'v' and string 'type'): {_preview(obj)}"
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
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError) as exc:
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
