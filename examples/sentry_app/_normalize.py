"""Turn a raw event payload into the one shape the rest of the pipeline reads.

`normalize` is the first step of the ingestion workflow and it runs again on
every replay, so it must be a pure function: the same payload gives the same
dict, byte for byte, in any process. That is why an event without an id gets one
derived from a hash of its content rather than a random uuid, and why an event
without a timestamp is left without one instead of being stamped with "now".

The output is made only of JSON types, so it can be passed between workflow
steps and written to a journal without conversion. Normalizing a normalized
event changes nothing.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Mapping
from typing import Any

from ._payload import (
    JSON,
    LEGACY_KEYS,
    canonical_json,
    event_platform,
    to_json,
    values_of,
)

__all__ = ["normalize", "parse_timestamp"]

LEVELS = ("debug", "info", "warning", "error", "fatal")
_LEVEL_ALIASES = {"warn": "warning", "critical": "fatal", "log": "info"}
# Old SDKs (raven-python) sent the `logging` module's numeric levels.
_NUMERIC_LEVELS = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "fatal"}

# Namespace of the ids this example derives for events that arrive without one.
_EVENT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "coda:examples/sentry_app/event")

_HEX32 = re.compile(r"[0-9a-f]{32}")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
# A conversion with a `*` or a four-digit width or precision could make `%`
# allocate an enormous string from a few bytes of payload; such templates are
# left unformatted.
_WIDE_CONVERSION = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d{4,}|\.(\*|\d{4,}))")

# Keys that `normalize` rebuilds; every other key is carried over as it came.
_REBUILT = frozenset(
    {
        "event_id",
        "platform",
        "level",
        "timestamp",
        "tags",
        "breadcrumbs",
        "message",
        "logentry",
        "fingerprint",
        "exception",
        "threads",
        "errors",
    }
)


def normalize(
    event_data: Mapping[str, Any], default_platform: str | None = None
) -> dict[str, JSON]:
    """Return a new, JSON-only, canonical copy of a raw Sentry event payload.

    `default_platform` is used when the payload names no platform: Sentry's
    sample loader passes the sample's file stem ("python" for python.json).
    Values that cannot be read (a malformed timestamp, an unknown level) are
    dropped or defaulted, and recorded in the event's `errors` list the way
    Sentry reports them, rather than failing the whole event.
    """
    raw = to_json(dict(event_data))
    errors: list[JSON] = (
        list(raw["errors"]) if isinstance(raw.get("errors"), list) else []
    )

    # Step 1: legacy interface names. The canonical key wins if both are given.
    for legacy, canonical in LEGACY_KEYS.items():
        if legacy in raw:
            legacy_value = raw.pop(legacy)
            if raw.get(canonical) is None:
                raw[canonical] = legacy_value

    event: dict[str, JSON] = {k: v for k, v in raw.items() if k not in _REBUILT}
    event["platform"] = event_platform(raw, default_platform)
    event["level"] = _level(raw.get("level"), errors)

    timestamp = _timestamp_field(raw.get("timestamp"), "timestamp", errors)
    if timestamp is not None:
        event["timestamp"] = timestamp

    event["tags"] = _tags(raw.get("tags"), errors)
    event["breadcrumbs"] = {"values": _breadcrumbs(raw.get("breadcrumbs"))}

    # Step 2: the interfaces current SDKs may still send in a short form.
    for key in ("exception", "threads"):
        if raw.get(key) is not None:
            event[key] = {"values": values_of(raw[key])}

    logentry = _logentry(raw.get("logentry"), raw.get("message"))
    if logentry:
        event["logentry"] = logentry
        message = logentry.get("formatted", logentry.get("message"))
        if isinstance(message, str):
            event["message"] = message

    fingerprint = raw.get("fingerprint")
    if isinstance(fingerprint, list) and fingerprint:
        event["fingerprint"] = [_fingerprint_part(part) for part in fingerprint]

    event_id = _event_id(raw.get("event_id"))
    if event_id is None and raw.get("event_id") is not None:
        errors.append(_error("event_id", raw["event_id"]))
    if errors:
        event["errors"] = errors

    # Step 3: a missing id last, because a derived id hashes everything else. The
    # same event always hashes the same, whichever spelling (legacy keys, dict
    # tags, ISO timestamp) it arrived in.
    if event_id is None:
        event_id = uuid.uuid5(_EVENT_ID_NAMESPACE, canonical_json(event)).hex
    event["event_id"] = event_id
    return dict(sorted(event.items()))


def parse_timestamp(value: Any) -> float | None:
    """Epoch seconds from a number, a numeric string or an ISO 8601 string.

    ISO strings without an offset are taken as UTC, as Sentry takes them.
    Returns None for anything else.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        number = float(value)
        return number if number == number and abs(number) != float("inf") else None
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            return parse_timestamp(float(text))
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _error(name: str, value: JSON) -> dict[str, JSON]:
    return {"type": "invalid_data", "name": name, "value": value}


def _event_id(value: JSON) -> str | None:
    if not isinstance(value, str):
        return None
    candidate = value.strip().lower().replace("-", "")
    if candidate.startswith("{") and candidate.endswith("}"):
        candidate = candidate[1:-1]
    return candidate if _HEX32.fullmatch(candidate) else None


def _level(value: JSON, errors: list[JSON]) -> str:
    if value is None:
        return "error"
    if isinstance(value, int) and not isinstance(value, bool):
        if value in _NUMERIC_LEVELS:
            return _NUMERIC_LEVELS[value]
    elif isinstance(value, str):
        level = value.strip().lower()
        level = _LEVEL_ALIASES.get(level, level)
        if level in LEVELS:
            return level
    errors.append(_error("level", value))
    return "error"


def _timestamp_field(value: JSON, name: str, errors: list[JSON]) -> float | None:
    if value is None:
        return None
    timestamp = parse_timestamp(value)
    if timestamp is None:
        errors.append(_error(name, value))
    return timestamp


def _tags(value: JSON, errors: list[JSON]) -> list[JSON]:
    """Tags as sorted `[key, value]` string pairs, from a dict or a list of pairs."""
    if value is None:
        return []
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = []
        for item in value:
            if isinstance(item, list) and len(item) == 2:
                pairs.append((item[0], item[1]))
            else:
                errors.append(_error("tags", item))
    else:
        errors.append(_error("tags", value))
        return []

    tags = set()
    for key, tag_value in pairs:
        if key is None or tag_value is None:
            continue
        tags.add((_tag_text(key), _tag_text(tag_value)))
    return [list(pair) for pair in sorted(tags)]


def _tag_text(value: JSON) -> str:
    return value if isinstance(value, str) else canonical_json(value)


def _breadcrumbs(value: JSON) -> list[JSON]:
    crumbs = []
    for crumb in values_of(value):
        if not isinstance(crumb, dict):
            continue
        crumb = dict(crumb)
        timestamp = parse_timestamp(crumb.get("timestamp"))
        if timestamp is not None:
            crumb["timestamp"] = timestamp
        crumbs.append(crumb)
    return crumbs


def _logentry(logentry: JSON, message: JSON) -> dict[str, JSON]:
    """`{"message": template, "params": [...], "formatted": text}`, parts optional.

    The template is what grouping reads; the formatted text is what people read.
    An SDK that already formatted the message is trusted; otherwise the template
    is formatted here with Python `%` rules, which is what the Python SDKs and
    raven-php use.
    """
    if isinstance(logentry, str):
        logentry = {"formatted": logentry}
    if not isinstance(logentry, dict) or not logentry:
        # A bare `message`; old SDKs also sent the whole logentry there.
        if isinstance(message, dict):
            logentry = message
        elif isinstance(message, str) and message:
            logentry = {"formatted": message}
        else:
            return {}

    result: dict[str, JSON] = {}
    template = logentry.get("message")
    if isinstance(template, str):
        result["message"] = template
    params = logentry.get("params")
    if params is not None and params != [] and params != {}:
        result["params"] = params
    formatted = logentry.get("formatted")
    if isinstance(formatted, str):
        result["formatted"] = formatted
    elif isinstance(template, str):
        result["formatted"] = _format(template, params)
    elif isinstance(message, str) and message:
        result["formatted"] = message
    return result


def _format(template: str, params: JSON) -> str:
    if (
        params is None
        or params == []
        or params == {}
        or _WIDE_CONVERSION.search(template)
    ):
        return template
    args: Any = (
        params
        if isinstance(params, dict)
        else tuple(params if isinstance(params, list) else [params])
    )
    try:
        return str(template % args)
    except (TypeError, ValueError, KeyError):
        return template


def _fingerprint_part(part: JSON) -> str:
    return part if isinstance(part, str) else canonical_json(part)
