"""A memory probe inside `coda run`'s supervisor, for W6 only.

`benchmarks.apps.coda_app` imports this module; with `CODA_BENCH_PROBE=PATH`
set, and only in the supervisor process (`python -m coda run ...`), it
installs a SIGUSR1 handler that writes to PATH what the supervisor's memory is
made of: live Python objects (by type, from the garbage collector's view),
bytes held by the Python allocator, bytes held by SQLite
(`sqlite3_memory_used`, page caches included) and VmRSS. Coda itself is
unchanged: this lives in the benchmark's app module, which the supervisor
imports to learn the workflows.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import json
import os
import signal
import sys
from typing import Any

__all__ = ["install"]


def _sqlite_bytes() -> int:
    try:
        import _sqlite3

        used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    except (ImportError, OSError, AttributeError):
        return -1
    used.restype = ctypes.c_int64
    return int(used())


def snapshot() -> dict[str, Any]:
    gc.collect()
    objects = gc.get_objects()
    types = collections.Counter(type(o).__qualname__ for o in objects)
    rss_kb = 0
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return {
        "gc_objects": len(objects),
        "top_types": types.most_common(12),
        "python_blocks": sys.getallocatedblocks(),
        "sqlite_bytes": _sqlite_bytes(),
        "rss_kb": rss_kb,
    }


def install(path: str) -> None:
    def dump(_signum: int, _frame: Any) -> None:
        with contextlib.suppress(OSError):
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as out:
                json.dump(snapshot(), out)
            os.replace(tmp, path)

    signal.signal(signal.SIGUSR1, dump)


if os.environ.get("CODA_BENCH_PROBE") and sys.argv[1:2] == ["run"]:
    install(os.environ["CODA_BENCH_PROBE"])
