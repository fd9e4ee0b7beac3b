"""Readers never disturb the writer (see `readers.py` for what is measured)."""

from __future__ import annotations

from tests.chaos.procs import Coda, short_workdir
from tests.chaos.readers import describe, measure


def test_readers_beside_a_busy_supervisor_never_fail_nor_see_a_lock() -> None:
    with (
        short_workdir() as workdir,
        Coda(workdir, "tests.chaos.chaos_app", workers=2) as coda,
    ):
        figures = measure(coda, runs=1500, cli_calls=6)
        readers = figures["readers"]
        print(describe(figures))
        assert readers.cli_calls > 0 and readers.direct_reads > 0
        assert readers.cli_failures == []
        assert readers.direct_failures == []
