"""An app that imports in the supervisor and fails to in its workers, as one
that needs something only the supervisor's environment has would.

Each failed import in a worker adds a line to `worker-imports.log` in the
working directory, so that a test can count the workers started.
"""

from __future__ import annotations

import sys
from pathlib import Path

import coda

if getattr(sys.modules["__main__"].__spec__, "name", "") == "coda.runtime.worker":
    with Path("worker-imports.log").open("a") as log:
        log.write("import\n")
    raise RuntimeError("this app cannot be imported in a worker")


@coda.workflow()
async def nothing() -> None:
    return None
