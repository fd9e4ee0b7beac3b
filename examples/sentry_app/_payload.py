"""Shared helpers for reading Sentry event payloads, raw or normalized.

Every function here is pure: it reads its arguments, never the clock, the
environment or a file, so the steps built on them give the same answer when a
workflow is replayed.

Raw payloads come in two spellings. Old SDKs (raven-python, raven-php, old
sentry-java) write interfaces under their legacy names, `sentry.interfaces.*`;
current SDKs write the short names. The readers below accept both, so that
`needs_symbolication` and the grouping functions work on an event whether or not
it has been through `normalize` yet.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, TypeAlias

JSON: TypeAlias = Any
"""A JSON value: None, bool, int, float, str, list of JSON, dict of str to JSON."""

# Legacy interface name -> canonical key. The first seven are what the bundled
# samples use; `DebugMeta` and `Threads` follow the same pattern in old payloads.
LEGACY_KEYS: dict[str, str] = {
    "sentry.interfaces.Exception": "exception",
    "sentry.interfaces.Stacktrace": "stacktrace",
    "sentry.interfaces.Breadcrumbs": "breadcrumbs",
    "sentry.interfaces.User": "user",
    "sentry.interfaces.Http": "request",
    "sentry.interfaces.Message": "logentry",
    "sentry.interfaces.Template": "template",
    "sentry.interfaces.DebugMeta": "debug_meta",
    "sentry.interfaces.Threads": "threads",
}
_ALIASES: dict[str, tuple[str, ...]] = {}
for _legacy, _canonical in LEGACY_KEYS.items():
    _ALIASES[_canonical] = (*_ALIASES.get(_canonical, ()), _legacy)

# Platforms whose frames carry raw addresses until they are symbolicated, and
# platforms whose frames point into JavaScript that may be minified.
NATIVE_PLATFORMS = frozenset({"native", "cocoa", "c", "objc", "swift"})
JS_PLATFORMS = frozenset({"javascript", "node", "cordova", "react-native"})
MINIFIED_PATH = re.compile(r"\.min\.js$|\.bundle(\.js)?$|\.jsbundle$")


def interface(event: Mapping[str, Any], key: str) -> Any:
    """Return `event[key]`, falling back to the key's legacy spellings."""
    value = event.get(key)
    if value is not None:
        return value
    for alias in _ALIASES.get(key, ()):
        value = event.get(alias)
        if value is not None:
            return value
    return None


def values_of(container: Any) -> list[Any]:
    """The `values` list of an interface sent as `{"values": [...]}` or a list."""
    if isinstance(container, list):
        return container
    if isinstance(container, dict):
        values = container.get("values")
        if isinstance(values, list):
            return values
        # A lone exception sent without the `values` wrapper.
        if "type" in container or "value" in container or "stacktrace" in container:
            return [container]
    return []


def exception_values(event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The exception chain, oldest (innermost cause) first, as the SDKs send it."""
    return [v for v in values_of(interface(event, "exception")) if isinstance(v, dict)]


def iter_stacktraces(event: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every stacktrace object of an event: exceptions, threads, then top level.

    The objects are yielded as they are stored in `event`, so a caller working on
    its own copy may replace their `frames`.
    """
    for value in exception_values(event):
        stacktrace = value.get("stacktrace")
        if isinstance(stacktrace, dict):
            yield stacktrace
    for thread in values_of(interface(event, "threads")):
        stacktrace = thread.get("stacktrace") if isinstance(thread, dict) else None
        if isinstance(stacktrace, dict):
            yield stacktrace
    stacktrace = interface(event, "stacktrace")
    if isinstance(stacktrace, dict):
        yield stacktrace


def frames_of(stacktrace: Mapping[str, Any]) -> list[dict[str, Any]]:
    frames = stacktrace.get("frames")
    if not isinstance(frames, list):
        return []
    return [f for f in frames if isinstance(f, dict)]


def iter_frames(event: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for stacktrace in iter_stacktraces(event):
        yield from frames_of(stacktrace)


def event_platform(event: Mapping[str, Any], default_platform: str | None) -> str:
    platform = event.get("platform")
    if isinstance(platform, str) and platform:
        return platform
    return default_platform or "other"


def frame_platform(frame: Mapping[str, Any], platform: str) -> str:
    """A frame may name its own platform (a JS frame in a Cordova app does)."""
    own = frame.get("platform")
    return own if isinstance(own, str) and own else platform


def is_minified_js_frame(frame: Mapping[str, Any], platform: str) -> bool:
    if frame_platform(frame, platform) not in JS_PLATFORMS:
        return False
    if frame.get("colno") is None:
        return False
    path = frame.get("abs_path") or frame.get("filename") or ""
    return isinstance(path, str) and MINIFIED_PATH.search(path) is not None


def is_native_address_frame(frame: Mapping[str, Any], platform: str) -> bool:
    return frame_platform(frame, platform) in NATIVE_PLATFORMS and bool(
        frame.get("instruction_addr")
    )


def parse_address(value: Any) -> int | None:
    """An address or size given as an int, "0x..." hex or a decimal string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    try:
        number = int(text, 16) if text.startswith("0x") else int(text, 10)
    except ValueError:
        return None
    return number if number >= 0 else None


def to_json(value: Any) -> JSON:
    """A deep copy of `value` made only of JSON types, converting what is not.

    Tuples and sets become lists (sets sorted, so that the result does not depend
    on string hashing), non-string keys become strings, datetimes and dates
    become ISO strings, NaN and infinities become None, bytes are decoded as
    UTF-8 with replacement, and any other object becomes `str(obj)`.
    """
    # Iterative, so that a deeply nested payload cannot hit the recursion limit.
    root: list[JSON] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while stack:
        item, parent, slot = stack.pop()
        if isinstance(item, dict):
            copy: dict[str, JSON] = {}
            parent[slot] = copy
            for key, child in item.items():
                copy[_json_key(key)] = None
                stack.append((child, copy, _json_key(key)))
        elif isinstance(item, (list, tuple, set, frozenset)):
            items = list(item)
            if isinstance(item, (set, frozenset)):
                items.sort(key=lambda x: canonical_json(to_json(x)))
            copy_list: list[JSON] = [None] * len(items)
            parent[slot] = copy_list
            stack.extend((child, copy_list, i) for i, child in enumerate(items))
        else:
            parent[slot] = _json_scalar(item)
    return root[0]


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return str(key)
    if key is None or isinstance(key, (bool, int, float)):
        # The spelling json.dumps would give the key.
        return json.dumps(_json_scalar(key))
    return str(key)


def _json_scalar(item: Any) -> JSON:
    if item is None or isinstance(item, bool):
        return item
    if isinstance(item, int):
        return int(item)
    if isinstance(item, float):
        return float(item) if math.isfinite(item) else None
    if isinstance(item, str):
        return str(item)
    if isinstance(item, (dt.datetime, dt.date, dt.time)):
        return item.isoformat()
    if isinstance(item, (bytes, bytearray)):
        return bytes(item).decode("utf-8", errors="replace")
    return str(item)


def canonical_json(value: JSON) -> str:
    """One spelling per JSON value: sorted keys, no spaces, no ASCII escaping."""
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def stable_hash(value: JSON) -> str:
    """32 lowercase hex chars identifying `value`, the same in every process."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:32]
