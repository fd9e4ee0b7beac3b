"""JSON values: the only things that cross processes and reach the journal.

A value is checked where it is produced (a submission's arguments, a task's
arguments, a task's or workflow's result), before anything is written, so that a
`datetime` in an argument is refused with its path named instead of failing half
way through a run. Tuples and non-string keys are refused rather than silently
turned into lists and strings: a value that changes on a round trip through the
journal would make replay see something other than the live run did.
"""

from __future__ import annotations

import math
from typing import Any, TypeAlias

import orjson

from coda.errors import ValueNotJSON, ValueTooLarge

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "JSON",
    "check_json",
    "check_size",
    "dumps",
    "loads",
]

JSON: TypeAlias = Any
"""A JSON value: None, bool, int, float, str, list of JSON, dict of str to JSON."""

DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024


def check_json(value: object, where: str) -> None:
    """Raise `ValueNotJSON` naming the path of the first non-JSON part of `value`."""
    # Iterative, so that deeply nested values cannot hit the recursion limit.
    stack: list[tuple[object, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if item is None or isinstance(item, (str, bool)):
            continue
        if isinstance(item, int):
            if type(item) is not int:
                raise ValueNotJSON(_not_json(path, item))
            continue
        if isinstance(item, float):
            if type(item) is not float:
                raise ValueNotJSON(_not_json(path, item))
            if not math.isfinite(item):
                raise ValueNotJSON(
                    f"{path}: {item!r} is not a JSON value (JSON has no NaN or "
                    "infinity)"
                )
            continue
        if type(item) is list:
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
            continue
        if type(item) is dict:
            for k, v in item.items():
                if not isinstance(k, str):
                    raise ValueNotJSON(
                        f"{path}: key {k!r} is a {type(k).__name__}; JSON object "
                        "keys must be str"
                    )
                stack.append((v, f"{path}[{k!r}]"))
            continue
        raise ValueNotJSON(_not_json(path, item))


def _not_json(path: str, item: object) -> str:
    kind = type(item).__name__
    hint = ""
    if isinstance(item, tuple):
        hint = " (use a list)"
    elif kind in ("datetime", "date", "time"):
        hint = " (pass item.isoformat())"
    elif isinstance(item, (set, frozenset)):
        hint = " (use a sorted list)"
    elif isinstance(item, bytes):
        hint = " (decode it or base64-encode it)"
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


def dumps(value: JSON) -> bytes:
    """Encode a checked JSON value compactly."""
    return orjson.dumps(value)


def loads(data: bytes | str) -> JSON:
    return orjson.loads(data)
