"""Tests for coda.runtime.pool that need no worker process."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import sys
from typing import Any

import pytest

from coda.protocol import Connection, encode_frames
from coda.runtime.pool import WorkerHandle, WorkerPool


def test_a_message_the_supervisor_fails_on_is_logged_and_reading_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handled: list[tuple[str, bool]] = []

    def on_message(handle: WorkerHandle, msg: dict[str, Any]) -> None:
        handled.append((msg["op"], asyncio.current_task() is None))
        if msg["op"] == "bad":
            raise KeyError("run")

    async def on_lost(handle: WorkerHandle) -> None:
        raise AssertionError("not here")

    async def main() -> None:
        pool = WorkerPool("app", 1, on_message=on_message, on_lost=on_lost)
        ours, theirs = socket.socketpair()
        conn = await Connection.from_socket(ours, name="worker w1")
        handle = WorkerHandle("w1", None, conn, 0.0)  # type: ignore[arg-type]
        serving = asyncio.create_task(
            conn.serve(functools.partial(pool._handle, handle))
        )
        await asyncio.sleep(0.01)
        ops = ["outcome", "bad", "outcome", "pong"]
        theirs.sendall(encode_frames([{"op": op} for op in ops]))
        theirs.close()
        async with asyncio.timeout(5):
            await serving
        await conn.close()

    with caplog.at_level(logging.ERROR, logger="coda.runtime.pool"):
        asyncio.run(main())
    # Every message handled as it arrived, the one that failed included.
    assert handled == [
        ("outcome", True),
        ("bad", True),
        ("outcome", True),
        ("pong", True),
    ]
    [record] = caplog.records
    assert "w1" in record.getMessage() and "'bad'" in record.getMessage()
    assert "this is a bug" in record.getMessage()
    assert record.exc_info is not None


def test_a_worker_whose_link_fails_is_lost_and_its_tries_rescheduled() -> None:
    lost: list[str | None] = []

    async def on_lost(handle: WorkerHandle) -> None:
        lost.append(handle.lost_reason)

    async def main() -> None:
        pool = WorkerPool("app", 1, on_message=lambda h, m: None, on_lost=on_lost)
        pool._schedule_respawn = lambda: None  # type: ignore[method-assign]
        ours, theirs = socket.socketpair()
        conn = await Connection.from_socket(ours, name="worker w1")

        async def failing(handler: Any) -> None:
            raise OSError(5, "Input/output error")

        conn.serve = failing  # type: ignore[method-assign]
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        handle = WorkerHandle("w1", process, conn, 0.0)
        pool.workers.append(handle)
        async with asyncio.timeout(10):
            await pool._read(handle)
        theirs.close()
        assert not handle.alive
        assert handle not in pool.workers

    asyncio.run(main())
    assert lost == ["its connection failed: [Errno 5] Input/output error"]
