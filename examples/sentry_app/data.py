"""Load raw event payloads from files, the way Sentry's sample loader does.

A `.jsonl` file holds one event per line. A `.json` file holds one event, whose
default platform is the file's stem: Sentry's loader calls
`load_data("python")` for `python.json` and sets the platform from that name,
which is why several samples carry no `platform` of their own. A directory is
searched recursively and its files are read in sorted order, so the result is
the same on every machine.

`BUNDLED_DATA` is the copy that ships with this example; see its README for
where the payloads come from and under which licences.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["BUNDLED_DATA", "load_events"]

BUNDLED_DATA = Path(__file__).resolve().parent / "data"

_SUFFIXES = (".json", ".jsonl")


def load_events(
    path: str | os.PathLike[str],
) -> list[tuple[dict[str, Any], str | None]]:
    """`(event, default_platform)` pairs from a .json/.jsonl file or a directory.

    Raises `ValueError`, naming the file and line, for a payload that is not a
    JSON object, and for a file that is neither .json nor .jsonl.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(
            (p for p in root.rglob("*") if p.is_file() and p.suffix in _SUFFIXES),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        return [pair for file in files for pair in _load_file(file)]
    return _load_file(root)


def _load_file(file: Path) -> list[tuple[dict[str, Any], str | None]]:
    if file.suffix == ".jsonl":
        events: list[tuple[dict[str, Any], str | None]] = []
        with file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    events.append(
                        (_as_event(json.loads(line), f"{file}:{number}"), None)
                    )
        return events
    if file.suffix == ".json":
        payload = json.loads(file.read_text(encoding="utf-8"))
        return [(_as_event(payload, str(file)), file.stem)]
    raise ValueError(f"{file}: not an event file; expected a .json or .jsonl file")


def _as_event(payload: Any, where: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise ValueError(
            f"{where}: an event payload must be a JSON object, "
            f"got {type(payload).__name__}"
        )
    return payload
