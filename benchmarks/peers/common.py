"""What the peer drivers share: their command line and their output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["emit", "parse"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("--runs", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=0)
    parser.add_argument("--early", type=int, default=0)
    parser.add_argument("--late", type=int, default=0)
    parser.add_argument("--wal", action="store_true")
    return parser.parse_args(argv)


def emit(figures: dict[str, Any]) -> None:
    """Print one repeat's figures as the last line: the runner reads it."""
    sys.stdout.write(json.dumps(figures) + "\n")
    sys.stdout.flush()
