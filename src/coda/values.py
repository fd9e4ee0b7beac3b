"""JSON values: the only things that cross processes and reach the journal.

A value is checked where it is produced (a submission's arguments, a task's
arguments, a task's or workflow's result), before anything is written, so that a
`datetime` in an argument is refused with its path named instead of failing half
way through a run. Tuples, non-string keys and subclasses of the JSON types (an
`IntEnum`, a `StrEnum`, an `OrderedDict`) are refused rather than silently turned
into lists, strings and plain dicts: a value that changes on a round trip through
the journal would make replay see something other than the live run did.

What the journal's encoder cannot store is refused here too, with its path:
integers outside 64 bits, strings holding lone surrogates (`os.fsdecode` makes
those from undecodable file names), and values nested more than `MAX_DEPTH`
levels deep. Above `MAX_DEPTH` the encoder gives up (an event wraps the value in
a few levels of its own), so the limit is set well below its 254 levels.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeAlias

import orjson

from coda.errors import ValueNotJSON, ValueTooLarge

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "JSON",
    "MAX_DEPTH",
    "check_json",
    "check_size",
    "check_value",
    "dumps",
    "loads",
]

JSON: TypeAlias = Any
"""A JSON value: None, bool, int, float, str, list of JSON, dict of str to JSON."""

DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024

MAX_DEPTH = 128
"""Lists and dicts nested deeper than this are refused."""

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

# A position inside a value, built only when an error needs it: (parent, key),
# where key is a list index or a dict key; None is the value itself.
_Where: TypeAlias = "tuple[_Where, int | str] | None"


def check_json(value: object, where: str) -> None:
    """Raise `ValueNotJSON` naming the path of the first non-JSON part of `value`.

    `where` names the value (`args of task t`); a path inside it is appended in
    JSON notation: `args of task t["event_data"]["received"]`.
    """
    if not _plain(value, 0):
        _find_fault(value, where)


def _find_fault(value: object, where: str) -> None:
    """`check_json`'s walk for a value `_plain` refused: what is wrong, and where."""
    # Iterative, so that deeply nested values cannot hit the recursion limit;
    # children are pushed in reverse so that the first bad part is reported.
    stack: list[tuple[Any, _Where, int]] = [(value, None, 0)]
    while stack:
        item, at, depth = stack.pop()
        kind = type(item)
        if item is None or kind is bool:
            continue
        if kind is str:
            _check_str(item, where, at)
        elif kind is int:
            if not _INT_MIN <= item <= _INT_MAX:
                raise ValueNotJSON(
                    f"{_path(where, at)}: integer {item} is outside the 64-bit range "
                    "the journal stores (pass it as a string)"
                )
        elif kind is float:
            if not math.isfinite(item):
                raise ValueNotJSON(
                    f"{_path(where, at)}: {item!r} is not a JSON value (JSON has no "
                    "NaN or infinity)"
                )
        elif kind is list or kind is dict:
            if depth >= MAX_DEPTH:
                raise ValueNotJSON(
                    f"{_path(where, at)}: nested more than {MAX_DEPTH} levels deep; "
                    "the journal refuses deeper values"
                )
            children: list[tuple[Any, Any]]
            if kind is list:
                children = list(enumerate(item))
            else:
                children = list(item.items())
                for key, _ in children:
                    if type(key) is not str:
                        raise ValueNotJSON(
                            f"{_path(where, at)}: key {key!r} is a "
                            f"{type(key).__name__}; JSON object keys must be str"
                        )
                    _check_str(key, where, at, is_key=True)
            stack.extend((v, (at, k), depth + 1) for k, v in reversed(children))
        else:
            raise ValueNotJSON(_not_json(_path(where, at), item))


def _plain(value: Any, depth: int) -> bool:
    """Whether `check_json` passes `value` (at `depth`), without saying why not.

    Every value a task or workflow passes is checked, and nearly all pass:
    this is the path they take. It is `check_json`'s walk without the
    bookkeeping of where each part sits (a tuple for every node), with the
    leaves of a container checked in its loop instead of a call each: a
    W1 event of 42 nodes in about a fifth of the time. Anything refused
    is walked again by `check_json`, which says what and where.
    """
    kind = type(value)
    if kind is dict or kind is list:
        if depth >= MAX_DEPTH:
            return False
        depth += 1
        items: Any
        if kind is dict:
            for key in value:
                if type(key) is not str or not (key.isascii() or _utf8(key)):
                    return False
            items = value.values()
        else:
            items = value
        for item in items:
            kind = type(item)
            if kind is str:
                if not (item.isascii() or _utf8(item)):
                    return False
            elif kind is dict or kind is list:
                if not _plain(item, depth):
                    return False
            elif kind is int:
                if not _INT_MIN <= item <= _INT_MAX:
                    return False
            elif kind is float:
                if not math.isfinite(item):
                    return False
            elif item is not None and kind is not bool:
                return False
        return True
    if kind is str:
        text: str = value
        return text.isascii() or _utf8(text)
    if kind is int:
        number: int = value
        return _INT_MIN <= number <= _INT_MAX
    if kind is float:
        return math.isfinite(value)
    return value is None or kind is bool


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_str(text: str, where: str, at: _Where, is_key: bool = False) -> None:
    if text.isascii() or _utf8(text):
        return
    what = "key" if is_key else "str"
    raise ValueNotJSON(
        f"{_path(where, at)}: {what} {text!r} holds a lone surrogate and is not "
        "valid Unicode text (decode the bytes it came from properly)"
    )


def _path(where: str, at: _Where) -> str:
    keys: list[int | str] = []
    while at is not None:
        at, key = at
        keys.append(key)
    return where + "".join(f"[{_quote(key)}]" for key in reversed(keys))


def _quote(key: int | str) -> str:
    if isinstance(key, int):
        return str(key)
    try:
        return json.dumps(key, ensure_ascii=False).encode("utf-8").decode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(key)  # a lone surrogate: escape it


_JSON_TYPES = (str, int, float, list, dict)


def _not_json(path: str, item: object) -> str:
    kind = type(item).__name__
    hint = ""
    if isinstance(item, tuple):
        hint = " (use a list)"
    elif kind in ("datetime", "date", "time"):
        hint = " (pass item.isoformat())"
    elif isinstance(item, (set, frozenset)):
        hint = " (use a sorted list)"
    elif isinstance(item, (bytes, bytearray)):
        hint = " (decode it or base64-encode it)"
    else:
        base = next((b for b in _JSON_TYPES if isinstance(item, b)), None)
        if base is not None:
            hint = f" (a subclass of {base.__name__}; pass a plain {base.__name__})"
    return f"{path}: {kind} is not a JSON value{hint}"


def check_size(
    encoded: bytes, where: str, limit: int = DEFAULT_MAX_VALUE_BYTES
) -> None:
    """Raise `ValueTooLarge` when an encoded value is over `limit` bytes."""
    if len(encoded) > limit:
        raise ValueTooLarge(
            f"{where}: {len(encoded)} bytes encoded, over the limit of {limit} bytes; "
            "store large payloads elsewhere and pass a reference"
        )


def check_value(
    value: object, where: str, limit: int = DEFAULT_MAX_VALUE_BYTES
) -> bytes:
    """`check_json`, then `check_size`: a value fit for the journal, encoded."""
    check_json(value, where)
    encoded = dumps(value)
    check_size(encoded, where, limit)
    return encoded


def dumps(value: JSON) -> bytes:
    """Encode a checked JSON value compactly."""
    return orjson.dumps(value)


def loads(data: bytes | str) -> JSON:
    return orjson.loads(data)
