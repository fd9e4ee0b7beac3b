"""Make the example apps importable as top-level packages (`import sentry_app`).

They are imported by their own name rather than as `examples.sentry_app`: this
test directory is itself a package named `examples` (pytest imports it as such
while `tests/` has no `__init__.py`), which would shadow the repository's
`examples/` package.
"""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"

if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))
