"""Run ids the supervisor makes up: uuid4's form, never the same twice."""

from __future__ import annotations

import uuid

from coda.runtime.server import RunIds


def test_made_up_run_ids_are_distinct_version_4_uuids_across_batches() -> None:
    ids = RunIds()
    made = [ids.next() for _ in range(3 * RunIds.BATCH + 7)]
    assert len(set(made)) == len(made)
    for run_id in made:
        parsed = uuid.UUID(hex=run_id)
        assert parsed.hex == run_id  # 32 lower-case hex digits, no dashes
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_two_sources_do_not_repeat_each_other() -> None:
    first, second = RunIds(), RunIds()
    assert {first.next() for _ in range(500)}.isdisjoint(
        second.next() for _ in range(500)
    )
