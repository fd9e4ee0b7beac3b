"""Malformed traffic on the client socket: an error, a closed connection, and
the supervisor goes on serving everyone else."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import orjson

from coda.runtime.client import Client

from .support import CodaProcess

HELLO = {"op": "hello", "protocol": 1, "role": "client"}


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def message(msg: dict[str, Any]) -> bytes:
    return frame(orjson.dumps(msg))


async def read_to_end(
    reader: asyncio.StreamReader, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Every frame the supervisor sends until it closes the connection."""
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                header = await reader.readexactly(4)
            except asyncio.IncompleteReadError as exc:
                assert exc.partial == b"", "the connection closed mid-frame"
                return frames
            except ConnectionResetError:
                return frames
            (length,) = struct.unpack(">I", header)
            frames.append(orjson.loads(await reader.readexactly(length)))


async def exchange(
    coda: CodaProcess, data: bytes, *, hello: bool, close_after: bool = False
) -> list[dict[str, Any]]:
    """Connect raw, optionally say hello, send `data`; what came back until EOF."""
    reader, writer = await asyncio.open_unix_connection(str(coda.socket))
    try:
        replies = []
        if hello:
            writer.write(message(HELLO))
            await writer.drain()
            header = await reader.readexactly(4)
            (length,) = struct.unpack(">I", header)
            welcome = orjson.loads(await reader.readexactly(length))
            assert welcome["op"] == "welcome"
        writer.write(data)
        await writer.drain()
        if close_after:
            writer.close()
            return []
        replies = await read_to_end(reader)
    finally:
        writer.close()
    return replies


BAD_TRAFFIC: dict[str, tuple[bytes, bool, str]] = {
    # name: (bytes sent, after a hello?, error code expected)
    "http-request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, "frame"),
    "garbage-after-hello": (b"\x00\x00\x00\x05\xff\xfe\xfd\xfc\xfb", True, "frame"),
    "2-GiB-header": (struct.pack(">I", 2**31) + b"{}", True, "frame"),
    "2-GiB-header-before-hello": (struct.pack(">I", 2**31), False, "frame"),
    "not-json": (frame(b"{this is not json"), True, "frame"),
    "json-not-an-object": (frame(b"[1, 2, 3]"), True, "frame"),
    "zero-length": (frame(b""), True, "frame"),
    "unknown-op": (message({"op": "launch-missiles", "id": 1}), True, "unknown-op"),
    "request-before-hello": (message({"op": "stats", "id": 1}), False, "handshake"),
    "wrong-protocol": (message({**HELLO, "protocol": 99}), False, "version"),
    "worker-role": (message({**HELLO, "role": "worker"}), False, "handshake"),
}


async def good_client_loop(
    coda: CodaProcess, stop: asyncio.Event, results: list[tuple[int, Any]]
) -> None:
    async with await Client.connect(coda.socket) as client:
        x = 0
        while not stop.is_set() or x < 5:
            run_id = await client.submit("quick", {"x": x})
            results.append((x, await client.result(run_id, timeout=10)))
            x += 1


def test_bad_frames_get_an_error_and_a_closed_connection(coda: CodaProcess) -> None:
    async def scenario() -> tuple[dict[str, list[dict[str, Any]]], list[Any]]:
        stop = asyncio.Event()
        results: list[tuple[int, Any]] = []
        good = asyncio.create_task(good_client_loop(coda, stop, results))
        seen: dict[str, list[dict[str, Any]]] = {}
        for _ in range(3):
            for name, (data, hello, _code) in BAD_TRAFFIC.items():
                seen[name] = await exchange(coda, data, hello=hello)
            # Peers that vanish mid-frame, before and after their hello.
            await exchange(
                coda, b"\x00\x00\x01\x00" + b"x" * 10, hello=True, close_after=True
            )
            await exchange(coda, b"\x00\x00", hello=False, close_after=True)
            await exchange(coda, message(HELLO)[:7], hello=False, close_after=True)
        stop.set()
        await asyncio.wait_for(good, 30)
        return seen, results

    seen, results = asyncio.run(scenario())

    for name, (_data, _hello, code) in BAD_TRAFFIC.items():
        replies = seen[name]
        assert [r["op"] for r in replies] == ["error"], (name, replies)
        assert replies[0]["code"] == code, (name, replies)
        assert replies[0]["message"], name
    assert "not speaking the Coda protocol" in seen["http-request"][0]["message"]
    assert "over the limit" in seen["2-GiB-header"][0]["message"]
    assert "launch-missiles" in seen["unknown-op"][0]["message"]

    # The good client was served throughout, and still is.
    assert len(results) >= 5
    assert results == [(x, 2 * x + 1) for x in range(len(results))]
    assert coda.alive()
    with coda.client() as client:
        assert client.result(client.submit("quick", {"x": 20}), timeout=10) == 41
        assert client.stats()["workers"] == 2
    assert "Traceback" not in coda.log_text()


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    # (request, the exception Client.request raises for its error reply)
    ({"op": "submit", "workflow": "no-such-workflow", "args": {}}, "UnknownNameError"),
    ({"op": "submit", "args": {}}, "RequestError"),
    ({"op": "submit", "workflow": "quick", "args": [1]}, "RequestError"),
    (
        {"op": "submit", "workflow": "quick", "args": {}, "run_id": "a b"},
        "RequestError",
    ),
    ({"op": "status", "run_id": "no-such-run"}, "RunNotFound"),
    ({"op": "wait", "run_id": 12}, "RequestError"),
    ({"op": "history", "run_id": ""}, "RequestError"),
    ({"op": "cancel", "run_id": "no-such-run"}, "RunNotFound"),
    ({"op": "list", "limit": "many"}, "RequestError"),
    ({"op": "list", "status": ["completed"]}, "RequestError"),
]


def test_bad_requests_keep_the_connection_open(coda: CodaProcess) -> None:
    """Well-formed frames asking for something impossible: an error reply each,
    naming the client's mistake, on a connection that stays usable."""

    async def scenario() -> tuple[list[tuple[str, str]], Any]:
        async with await Client.connect(coda.socket) as client:
            errors = []
            for request, _expected in BAD_REQUESTS:
                try:
                    await client.request(**request)
                except Exception as exc:
                    errors.append((type(exc).__name__, str(exc)))
                else:
                    errors.append(("no error", ""))
            run_id = await client.submit("quick", {"x": 1})
            return errors, await client.result(run_id, timeout=10)

    errors, result = asyncio.run(scenario())

    assert [name for name, _ in errors] == [expected for _, expected in BAD_REQUESTS]
    # None is reported as the supervisor failing: they are the client's mistakes.
    assert not [text for _, text in errors if "this is a bug" in text], errors
    assert result == 3
    assert coda.alive()
    assert "Traceback" not in coda.log_text()
