"""Fixtures: a fresh short directory, and a running `coda run e2e_app` in it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import CodaProcess, fresh_directory, running_supervisor


@pytest.fixture
def workdir() -> Iterator[Path]:
    with fresh_directory() as path:
        yield path


@pytest.fixture
def coda(workdir: Path) -> Iterator[CodaProcess]:
    """A running `coda run e2e_app` with 2 workers on a fresh journal."""
    with running_supervisor(workdir) as supervisor:
        yield supervisor


@pytest.fixture(scope="module")
def shared_coda() -> Iterator[CodaProcess]:
    """One `coda run e2e_app` for a whole module whose tests use distinct runs."""
    with fresh_directory() as path, running_supervisor(path) as supervisor:
        yield supervisor
