"""Which events are "the same problem": the grouping key, its hash, a title.

An event is grouped by the first of these it has:

1. An explicit `fingerprint` from the SDK, e.g. `["vat-rate-missing", "CH"]`.
   An entry `{{ default }}` stands for the key the event would get without a
   fingerprint, so a fingerprint can refine the default grouping instead of
   replacing it.
2. Its exceptions: the type of every exception in the chain, each followed by
   the function names of its stack frames. Only in-app frames count, unless no
   frame of the event is in-app, in which case all of them do. The message of
   an exception is left out on purpose: `KeyError: 'SKU-9999'` and
   `KeyError: 'SKU-0000'` raised at the same place are one problem.
3. Its top-level stacktrace, the same way (old raven-python message events).
4. Its message template, unformatted, so that "refund for order 5020 ..." and
   "refund for order 5021 ..." logged through one `%s` template are one problem.
   Without a template, the message itself.

Consecutive repeats of one function in a stack are collapsed to one, so that a
runaway recursion groups the same whether it was cut off 150 or 199 frames
deep.

The key is hashed (SHA-256 of its canonical JSON, first 32 hex chars) into the
group id. It reads only the event, so it is the same in every process and on
every replay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._payload import (
    exception_values,
    frames_of,
    interface,
    stable_hash,
)

__all__ = ["event_title", "fingerprint", "grouping_key"]

FINGERPRINT = "fingerprint"
EXCEPTION = "exception"
STACKTRACE = "stacktrace"
MESSAGE = "message"
FALLBACK = "fallback"

_DEFAULT_PLACEHOLDERS = frozenset({"{{ default }}", "{{default}}"})
_TITLE_MAX = 200


def grouping_key(event: Mapping[str, Any]) -> tuple[str, list[str]]:
    """`(kind, components)`: how the event is grouped, and by what.

    `kind` is one of "fingerprint", "exception", "stacktrace", "message" and
    "fallback" (an event with none of the above; all such events of a project
    share one group).
    """
    explicit = event.get("fingerprint")
    if isinstance(explicit, list) and explicit:
        components: list[str] = []
        for part in explicit:
            text = part if isinstance(part, str) else str(part)
            if text.strip() in _DEFAULT_PLACEHOLDERS:
                kind, default = _default_key(event)
                components.extend([f"default:{kind}", *default])
            else:
                components.append(text)
        return FINGERPRINT, components
    return _default_key(event)


def fingerprint(event: Mapping[str, Any]) -> str:
    """The group id: 32 hex chars, stable across processes and Python versions."""
    kind, components = grouping_key(event)
    return stable_hash([kind, components])


def event_title(event: Mapping[str, Any]) -> str:
    """A one-line human title: `"Type: value"` of the outermost exception, else
    the formatted message, else `"<unlabeled event>"`."""
    title = ""
    chain = exception_values(event)
    if chain:
        # The SDKs send the chain innermost first; the last one is what the
        # program saw (a `ConfigError` raised from a `KeyError`).
        outer = chain[-1]
        parts: tuple[Any, ...] = (outer.get("type"), outer.get("value"))
        if parts[0] == parts[1]:
            parts = parts[:1]
        title = ": ".join(str(part).strip() for part in parts if _text(part))
    if not title:
        title = _message(event, template=False)
    return _one_line(title) or "<unlabeled event>"


def _default_key(event: Mapping[str, Any]) -> tuple[str, list[str]]:
    chain = exception_values(event)
    if chain:
        stacks = [_stack_functions(value.get("stacktrace")) for value in chain]
        in_app_only = any(in_app for stack in stacks for _, in_app in stack)
        components: list[str] = []
        for value, stack in zip(chain, stacks, strict=True):
            if _text(value.get("type")):
                components.append(f"type:{value['type']}")
            elif _text(value.get("value")):
                components.append(f"value:{value['value']}")
            components.extend(_function_components(stack, in_app_only))
        if components:
            return EXCEPTION, components

    stack = _stack_functions(interface(event, "stacktrace"))
    if stack:
        in_app_only = any(in_app for _, in_app in stack)
        components = _function_components(stack, in_app_only)
        if components:
            return STACKTRACE, components

    message = _message(event, template=True)
    if message:
        return MESSAGE, [message]
    return FALLBACK, []


def _stack_functions(stacktrace: Any) -> list[tuple[str, bool]]:
    """`(function, in_app)` for each frame with a function name, outermost first."""
    if not isinstance(stacktrace, dict):
        return []
    return [
        (frame["function"], frame.get("in_app") is True)
        for frame in frames_of(stacktrace)
        if _text(frame.get("function"))
    ]


def _function_components(stack: list[tuple[str, bool]], in_app_only: bool) -> list[str]:
    components: list[str] = []
    for function, in_app in stack:
        if in_app_only and not in_app:
            continue
        component = f"function:{function}"
        if not components or components[-1] != component:
            components.append(component)
    return components


def _message(event: Mapping[str, Any], *, template: bool) -> str:
    """The logentry's template (or its formatted text), else the bare message."""
    logentry = interface(event, "logentry")
    if isinstance(logentry, dict):
        order = ("message", "formatted") if template else ("formatted", "message")
        for key in order:
            if _text(logentry.get(key)):
                return str(logentry[key])
    elif _text(logentry):
        return str(logentry)
    message = event.get("message")
    if isinstance(message, dict):
        return _message({"logentry": message}, template=template)
    return str(message) if _text(message) else ""


def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _one_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) > _TITLE_MAX:
        line = line[: _TITLE_MAX - 1] + "…"
    return line
