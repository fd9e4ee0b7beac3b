"""TCP for clients: opt-in, loopback unless a token is set, and the token holds."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest

from coda.protocol import HandshakeRefused
from coda.runtime.client import SyncClient

from .support import PYTHON, CodaProcess, base_env, fresh_directory, running_supervisor

TOKEN = "s3cret-token"


@pytest.fixture
def coda() -> Iterator[CodaProcess]:
    args = ("--tcp", "127.0.0.1:0", "--token", TOKEN)
    with fresh_directory() as path, running_supervisor(path, args) as supervisor:
        yield supervisor


def _tcp_address(coda: CodaProcess) -> str:
    found = re.search(r"and (tcp://127\.0\.0\.1:\d+)", coda.log_text())
    assert found, coda.log_text()
    return found.group(1)


def test_tcp_with_the_token_serves_and_without_it_refuses(coda: CodaProcess) -> None:
    address = _tcp_address(coda)
    with SyncClient(address, token=TOKEN) as client:
        assert client.run("quick", {"x": 4}) == 9
    for token in (None, "wrong"):
        with pytest.raises(HandshakeRefused):
            SyncClient(address, token=token)
    # The token guards the Unix socket too.
    with pytest.raises(HandshakeRefused):
        SyncClient(coda.socket)
    with SyncClient(coda.socket, token=TOKEN) as client:
        assert client.run("quick", {"x": 5}) == 11


def test_tcp_beyond_loopback_needs_a_token() -> None:
    with fresh_directory() as path:
        done = subprocess.run(
            [PYTHON, "-m", "coda", "run", "e2e_app", "--tcp", "0.0.0.0:0"],
            cwd=path,
            env=base_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "without a token" in done.stderr
