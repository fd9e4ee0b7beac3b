"""A Sentry-style event-ingestion pipeline: the example app's own logic.

`events` holds the pure steps (normalize, symbolicate, group), `store` the
app's SQLite store, `data` the loader for the bundled sample payloads. None of
them imports Coda; the workflow that strings them together lives beside them.
"""

from __future__ import annotations

from .data import BUNDLED_DATA, load_events
from .events import (
    event_title,
    fingerprint,
    grouping_key,
    needs_symbolication,
    normalize,
    parse_timestamp,
    symbolicate,
)
from .store import list_groups, store_event, summary

__all__ = [
    "BUNDLED_DATA",
    "event_title",
    "fingerprint",
    "grouping_key",
    "list_groups",
    "load_events",
    "needs_symbolication",
    "normalize",
    "parse_timestamp",
    "store_event",
    "summary",
    "symbolicate",
]
