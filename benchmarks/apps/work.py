"""The work every system does, shared so that each peer does exactly the same.

The three steps of the example pipeline (`examples.sentry_app`): normalize the
event, symbolicate it, store it idempotently in a SQLite file. The event is a
small native crash (one frame with a raw instruction address inside a loaded
image), so that it needs symbolication and every run makes all three steps.
"""

from __future__ import annotations

import uuid
from typing import Any

from examples.sentry_app import store
from examples.sentry_app.events import normalize, symbolicate

__all__ = ["make_event", "normalize_step", "store_step", "symbolicate_step"]


def make_event(index: int) -> dict[str, Any]:
    """A small native event with a fresh id, so the store writes every run."""
    return {
        "event_id": uuid.uuid4().hex,
        "platform": "native",
        "level": "fatal",
        "timestamp": 1733300000.0 + index,
        "message": f"crash #{index}",
        "exception": {
            "values": [
                {
                    "type": "EXC_BAD_ACCESS",
                    "value": "SIGSEGV",
                    "stacktrace": {
                        "frames": [
                            {"instruction_addr": "0x100004f2c", "function": "main"},
                            {"instruction_addr": "0x10000a1f0"},
                        ]
                    },
                }
            ]
        },
        "debug_meta": {
            "images": [
                {
                    "type": "macho",
                    "code_file": "/usr/local/bin/app",
                    "image_addr": "0x100000000",
                    "image_size": 65536,
                }
            ]
        },
    }


def normalize_step(project_id: int, event_data: dict[str, Any]) -> dict[str, Any]:
    event = normalize(event_data, None)
    event["project_id"] = project_id
    return event


def symbolicate_step(project_id: int, event_data: dict[str, Any]) -> dict[str, Any]:
    return symbolicate(event_data)


def store_step(
    project_id: int, event_data: dict[str, Any], store_path: str
) -> dict[str, Any]:
    return store.store_event(store_path, project_id, event_data)
