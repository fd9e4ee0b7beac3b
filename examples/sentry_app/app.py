"""The Coda app of the example: Sentry-style event ingestion as a workflow.

    process_event(project_id, event_data, store)
        normalize_event          canonical keys, ids, timestamps
        symbolicate_event        only when a frame needs it (native addresses,
                                 minified JavaScript)
        store_event              group by fingerprint into the app's SQLite store

Start it with `coda run examples.sentry_app.app`; `python -m
examples.sentry_app.pipeline` does that and feeds it the bundled events.

Each task is spawned with a cache key built from the event id, so a run that
fails after normalizing and is retried does not normalize again. `store_event`
is idempotent by event id, because delivery is at least once: a worker that
dies after writing but before its result is journaled gets the task run again.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import coda
from examples.sentry_app import store
from examples.sentry_app.events import needs_symbolication, normalize, symbolicate


@coda.task(max_retries=2, backoff=0.1)
def normalize_event(
    project_id: int, event_data: dict[str, Any], default_platform: str | None = None
) -> dict[str, Any]:
    event = normalize(event_data, default_platform)
    event["project_id"] = project_id
    return event


@coda.task(retry_on=[TimeoutError, ConnectionError], max_retries=5, backoff=0.2)
def symbolicate_event(project_id: int, event_data: dict[str, Any]) -> dict[str, Any]:
    return symbolicate(event_data)


@coda.task(retry_on=[sqlite3.OperationalError], max_retries=5, backoff=0.05)
def store_event(
    project_id: int, event_data: dict[str, Any], store_path: str
) -> dict[str, Any]:
    return store.store_event(store_path, project_id, event_data)


@coda.workflow()
async def process_event(
    project_id: int,
    event_data: dict[str, Any],
    store_path: str,
    default_platform: str | None = None,
) -> dict[str, Any]:
    raw_id = event_data.get("event_id")
    event = await coda.context.spawn_task(
        normalize_event,
        args={
            "project_id": project_id,
            "event_data": event_data,
            "default_platform": default_platform,
        },
        cache_key=["normalize", raw_id] if raw_id else None,
    )
    event_id = event["event_id"]
    symbolicated = False
    if needs_symbolication(event):
        event = await coda.context.spawn_task(
            symbolicate_event,
            args={"project_id": project_id, "event_data": event},
            cache_key=["symbolicate", event_id],
        )
        symbolicated = True
    stored = await coda.context.spawn_task(
        store_event,
        args={"project_id": project_id, "event_data": event, "store_path": store_path},
        cache_key=["store", event_id],
    )
    return {**stored, "symbolicated": symbolicated, "platform": event.get("platform")}
