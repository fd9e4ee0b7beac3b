"""Connecting to a supervisor whose queue of connections not yet accepted is
full: a client waits its turn, then says it cannot reach one; never a raw
OSError (ENOTCONN) from the hello."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coda.errors import CodaError, ProtocolError
from coda.protocol import Connection, server_handshake
from coda.runtime import client as client_module
from coda.runtime.client import Client

from .support import PYTHON, base_env


@contextlib.contextmanager
def full_queue(path: Path) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listening Unix socket at `path` that accepts nobody, its queue filled
    with connections that never say hello; the listener and those."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    waiting: list[socket.socket] = []
    try:
        for _ in range(100):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(path))
            except BlockingIOError:
                sock.close()
                break
            waiting.append(sock)
        else:
            pytest.fail("the queue of the listening socket never filled")
        yield listener, waiting
    finally:
        for sock in [listener, *waiting]:
            sock.close()


def test_a_client_waits_its_turn_while_the_queue_is_full(workdir: Path) -> None:
    path = workdir / "s.sock"

    async def main() -> None:
        with full_queue(path) as (listener, waiting):
            connecting = asyncio.create_task(Client.connect(path, timeout=10))
            await asyncio.sleep(0.3)
            assert not connecting.done()

            # The supervisor gets round to accepting: the connections that
            # never said hello go, then the client is welcomed.
            for sock in waiting:
                sock.close()
            listener.setblocking(False)
            loop = asyncio.get_running_loop()
            while True:
                peer, _ = await loop.sock_accept(listener)
                conn = await Connection.from_socket(peer, name="client")
                try:
                    await server_handshake(conn, timeout=5)
                except ProtocolError:
                    await conn.close()  # one of those that never said hello
                    continue
                break
            client = await asyncio.wait_for(connecting, 5)
            await client.close()
            await conn.close()

    asyncio.run(main())


def test_a_queue_that_stays_full_is_a_supervisor_that_cannot_be_reached(
    workdir: Path,
) -> None:
    path = workdir / "s.sock"

    async def main() -> None:
        with full_queue(path):
            started = time.monotonic()
            with pytest.raises(CodaError) as refused:
                await Client.connect(path, timeout=0.5)
            assert time.monotonic() - started < 3
        assert str(refused.value).startswith(
            f"cannot reach a supervisor at {path}: [Errno 11] its queue of "
            "connections stayed full for 0.5 s; it is overloaded or stopped."
        )

    asyncio.run(main())


def test_a_link_failing_under_the_hello_is_a_supervisor_that_cannot_be_reached(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What asyncio made of a connection refused for a full queue: a socket it
    # took for connected, whose first write fails with ENOTCONN, an OSError
    # that the handshake's closing raised again.
    path = workdir / "s.sock"

    async def unconnected(target: str, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(target)
        return sock

    monkeypatch.setattr(client_module, "_unix_socket", unconnected)

    async def main() -> None:
        with full_queue(path), pytest.raises(CodaError) as refused:
            await Client.connect(path, timeout=2)
        assert not isinstance(refused.value, ProtocolError)
        assert str(refused.value).startswith(
            f"cannot reach a supervisor at {path}: [Errno 107]"
        )

    asyncio.run(main())


def test_submit_to_a_full_queue_exits_4_without_a_traceback(workdir: Path) -> None:
    journal = workdir / "coda.db"
    (workdir / ".coda").mkdir()
    with full_queue(workdir / ".coda" / "coda.db.sock"):
        done = subprocess.run(
            [PYTHON, "-m", "coda", "submit", "quick", '{"x": 1}', "-j", str(journal)],
            cwd=workdir,
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert "cannot reach a supervisor" in done.stderr
    assert "stayed full for 10 s" in done.stderr
