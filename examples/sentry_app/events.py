"""The pure steps of the event-ingestion example, in pipeline order.

    normalize -> needs_symbolication? -> symbolicate -> fingerprint -> store

Every function here is deterministic and does no I/O: it reads only its
arguments and returns a new JSON-only value, never mutating its input. That is
what lets a workflow call them directly, and replay them, without a task. Only
`store.store_event` touches the outside world.
"""

from __future__ import annotations

from ._grouping import event_title, fingerprint, grouping_key
from ._normalize import normalize, parse_timestamp
from ._symbolicate import needs_symbolication, symbolicate

__all__ = [
    "event_title",
    "fingerprint",
    "grouping_key",
    "needs_symbolication",
    "normalize",
    "parse_timestamp",
    "symbolicate",
]
