"""Strict reading of JSON objects: what generated readers have in common.

`coda.journal.codec` (events) and `coda.runtime.wire` (commands, error
descriptions) both read JSON objects into attrs classes with functions they
generate at import from the classes' fields. Each field is read with a
single type test on the path where it is right; the line that does it comes
from `CHECKS`, by the field's annotation, and calls the helpers here, found
under the names in `NAMESPACE`, only when the value is wrong or needs more
than one test. Values are never converted, except an integer where a float
is expected, as JSON does not tell them apart.

A location names a field in errors, JSONPath-like: `$.policy.retry_on[2]`.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["CHECKS", "MISSING", "NAMESPACE", "Malformed", "problem"]


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = _Missing()
"""What a reader holds for a field absent from the object."""


class Malformed(Exception):
    """A field that cannot be read; the reader's caller names what it read."""


def problem(location: str, expected: str, value: Any) -> Malformed:
    if value is MISSING:
        return Malformed(f"required field missing @ {location}")
    text = repr(value)
    if len(text) > 60:
        text = text[:60] + "..."
    return Malformed(f"invalid value, expected {expected}, found {text} @ {location}")


def _as_float(value: Any, location: str) -> float:
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            pass
    raise problem(location, "float", value)


def _as_strings(value: Any, location: str) -> tuple[str, ...]:
    if type(value) is not list:
        raise problem(location, "a list of str", value)
    for index, item in enumerate(value):
        if type(item) is not str:
            raise problem(f"{location}[{index}]", "str", item)
    return tuple(value)


def _is_object(value: Any) -> bool:
    if type(value) is not dict:
        return False
    for key in value:  # noqa: SIM110 (a loop is quicker than all() of a generator)
        if type(key) is not str:
            return False
    return True


NAMESPACE: Final[dict[str, Any]] = {
    "_MISSING": MISSING,
    "_problem": problem,
    "_as_float": _as_float,
    "_as_strings": _as_strings,
    "_is_object": _is_object,
}
"""The names generated code calls the helpers by."""

# How a field of each annotated type is read: `{x}` is the variable holding
# the value (or `_MISSING`), `{path}` the expression of its location. A reader
# generator refuses a field whose type is missing here (or from its own
# nested classes), so that a new field cannot be read laxly by accident.
CHECKS: Final[dict[Any, str]] = {
    str: "if type({x}) is not str: raise _problem({path}, 'str', {x})",
    int: "if type({x}) is not int: raise _problem({path}, 'int', {x})",
    float: "if type({x}) is not float: {x} = _as_float({x}, {path})",
    float | None: (
        "if type({x}) is not float and {x} is not None: {x} = _as_float({x}, {path})"
    ),
    Any: "if {x} is _MISSING: raise _problem({path}, 'a value', {x})",
    dict[str, Any]: (
        "if not _is_object({x}): raise _problem({path}, 'an object', {x})"
    ),
    list[Any]: "if type({x}) is not list: raise _problem({path}, 'a list', {x})",
    list[Any] | None: (
        "if type({x}) is not list and {x} is not None:"
        " raise _problem({path}, 'a list or null', {x})"
    ),
    tuple[str, ...]: "{x} = _as_strings({x}, {path})",
}
