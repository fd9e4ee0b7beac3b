"""`coda doctor` finds each kind of damage, names the run, and changes nothing."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import coda
from coda.doctor import check_journal

registry = coda.Registry()


@coda.task(registry=registry, name="doctor_echo")
def echo(value: int) -> int:
    return value


@coda.workflow(registry=registry, name="doctor_flow")
async def flow(n: int) -> int:
    a = await coda.context.spawn_task(echo, args={"value": n}, cache_key=["a", n])
    b = await coda.context.spawn_task(echo, args={"value": a + 1})
    return int(b)


def _journal(tmp_path: Path, runs: int = 3) -> Path:
    path = tmp_path / "coda.db"

    async def go() -> None:
        async with await coda.LocalRunner.open(path, registry=registry) as runner:
            for i in range(runs):
                assert await runner.run(flow, {"n": i}, run_id=f"run-{i}") == i + 1

    asyncio.run(go())
    return path


def _damage(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as db:
        for statement in statements:
            db.execute(statement)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_healthy_journal_has_no_problems(tmp_path: Path) -> None:
    path = _journal(tmp_path)
    assert asyncio.run(check_journal(path)) == []


def test_a_gap_in_a_history_is_named(tmp_path: Path) -> None:
    path = _journal(tmp_path)
    _damage(
        path,
        "DELETE FROM events WHERE seq = 3 AND rk = "
        "(SELECT rk FROM runs WHERE run_id = 'run-1')",
    )
    problems = asyncio.run(check_journal(path))
    assert any("run-1" in p and "without gaps" in p for p in problems), problems
    assert not any("run-0" in p or "run-2" in p for p in problems)


def test_a_projection_that_disagrees_with_the_fold_is_named(tmp_path: Path) -> None:
    path = _journal(tmp_path)
    _damage(
        path,
        "UPDATE runs SET status = 'failed' WHERE run_id = 'run-2'",
        "DELETE FROM task_cache WHERE rk ="
        " (SELECT rk FROM runs WHERE run_id = 'run-0')",
    )
    problems = asyncio.run(check_journal(path))
    assert any(
        "run-2" in p and "status='failed'" in p and "completed" in p for p in problems
    )
    assert any("run-0" in p and "task_cache" in p for p in problems)


def test_an_illegal_event_order_is_named(tmp_path: Path) -> None:
    path = _journal(tmp_path)
    # Swap the first task's completion and its start: the fold must refuse.
    _damage(
        path,
        "UPDATE events SET type = type WHERE 0",  # no-op, keeps the file written
        "UPDATE events SET body = (SELECT body FROM events e2 WHERE e2.rk = events.rk"
        " AND e2.seq = 4) WHERE seq = 3 AND rk = (SELECT rk FROM runs WHERE"
        " run_id = 'run-0')",
    )
    problems = asyncio.run(check_journal(path))
    assert any("run-0" in p and "illegal" in p for p in problems), problems


def test_the_doctor_changes_nothing(tmp_path: Path) -> None:
    path = _journal(tmp_path)
    _damage(path, "UPDATE runs SET status = 'failed' WHERE run_id = 'run-2'")
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = _digest(path)
    assert asyncio.run(check_journal(path))
    assert _digest(path) == before
