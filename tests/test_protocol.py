"""Tests for coda.protocol: framing, the decoder, connections and the handshake."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coda.errors import ProtocolError, ValueNotJSON, ValueTooLarge
from coda.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    ERROR_AUTH,
    ERROR_FRAME,
    ERROR_HANDSHAKE,
    ERROR_VERSION,
    PROTOCOL_VERSION,
    RAW,
    Connection,
    ConnectionClosed,
    FrameDecoder,
    HandshakeRefused,
    client_handshake,
    encode_frame,
    encode_frames,
    server_handshake,
)
from tests.runtime.support import decoded


def frame(payload: bytes) -> bytes:
    """A frame built by hand, independently of encode_frame."""
    return struct.pack(">I", len(payload)) + payload


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(main())


async def socket_pair(**kwargs: Any) -> tuple[Connection, Connection]:
    a, b = socket.socketpair()
    return (
        await Connection.from_socket(a, name="a", **kwargs),
        await Connection.from_socket(b, name="b", **kwargs),
    )


async def raw_pair(**kwargs: Any) -> tuple[Connection, socket.socket]:
    """A Connection whose peer is a plain blocking socket, for sending garbage."""
    a, b = socket.socketpair()
    b.settimeout(5)  # a test that goes wrong fails rather than hangs
    return await Connection.from_socket(a, name="raw peer", **kwargs), b


def read_all(sock: socket.socket) -> list[dict[str, Any]]:
    """Every message the peer sent until it closed (blocking)."""
    data = b""
    with sock:
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            data += chunk
    decoder = FrameDecoder()
    messages = decoder.feed(data)
    decoder.feed_eof()
    return messages


# --- encoding -------------------------------------------------------------


def test_encode_frame_is_length_then_json() -> None:
    msg = {"op": "ping", "n": 1}
    data = encode_frame(msg)
    assert data[:4] == struct.pack(">I", len(data) - 4)
    assert orjson.loads(data[4:]) == msg


def test_encode_frames_is_the_concatenation() -> None:
    msgs: list[dict[str, Any]] = [{"op": "a"}, {"op": "b", "x": [1, 2]}, {"op": "c"}]
    assert encode_frames(msgs) == b"".join(encode_frame(m) for m in msgs)
    assert encode_frames([]) == b""


def test_encode_refuses_bad_messages() -> None:
    with pytest.raises(ProtocolError, match="'op'"):
        encode_frame({"x": 1})
    with pytest.raises(ProtocolError, match="'op'"):
        encode_frame({"op": ""})
    with pytest.raises(ValueNotJSON, match="'ping'"):
        encode_frame({"op": "ping", "x": object()})
    with pytest.raises(ValueTooLarge, match=r"over the frame limit of 100 bytes"):
        encode_frame({"op": "big", "x": "y" * 200}, max_frame_bytes=100)


def test_frame_limit_must_fit_the_header() -> None:
    with pytest.raises(ValueError, match="4-byte header"):
        FrameDecoder(2**32)
    with pytest.raises(ValueError):
        FrameDecoder(0)


# --- decoding -------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
messages_st = st.builds(
    lambda op, rest: {**rest, "op": op},
    st.text(min_size=1, max_size=12),
    st.dictionaries(
        st.text(max_size=8).filter(lambda key: key != RAW), json_values, max_size=4
    ),
)


@settings(max_examples=300)
@given(msgs=st.lists(messages_st, max_size=20), data=st.data())
def test_any_chunking_decodes_to_the_same_messages(
    msgs: list[dict[str, Any]], data: st.DataObject
) -> None:
    stream = encode_frames(msgs)
    cuts = sorted(
        data.draw(st.lists(st.integers(0, len(stream)), max_size=len(stream) + 2))
    )
    decoder = FrameDecoder()
    out: list[dict[str, Any]] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out.extend(decoder.feed(stream[prev:cut]))
        prev = cut
    decoder.feed_eof()
    assert out == msgs
    assert decoder.buffered == 0


def test_split_at_every_byte_boundary() -> None:
    msgs: list[dict[str, Any]] = [
        {"op": "a", "v": "é" * 3},
        {"op": "bb", "n": [1, 2, 3]},
        {"op": "c"},
    ]
    stream = encode_frames(msgs)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        first = decoder.feed(stream[:cut])
        second = decoder.feed(stream[cut:])
        assert first + second == msgs, cut
        # What the first half completed is exactly the frames wholly inside it.
        assert first == msgs[: len(FrameDecoder().feed(stream[:cut]))]
    decoder = FrameDecoder()
    one_by_one = [
        m for i in range(len(stream)) for m in decoder.feed(stream[i : i + 1])
    ]
    assert one_by_one == msgs


def test_many_small_frames_in_one_chunk() -> None:
    msgs = [{"op": "tick", "i": i} for i in range(10_000)]
    decoder = FrameDecoder()
    assert decoder.feed(encode_frames(msgs)) == msgs
    assert decoder.buffered == 0


def test_large_frame_in_small_chunks_is_buffered_until_complete() -> None:
    msg = {"op": "big", "blob": "x" * 1_000_000}
    stream = encode_frame(msg) + encode_frame({"op": "after"})
    decoder = FrameDecoder()
    out: list[dict[str, Any]] = []
    for i in range(0, len(stream), 4096):
        out.extend(decoder.feed(stream[i : i + 4096]))
    assert out == [msg, {"op": "after"}]


def test_buffer_compaction_keeps_the_partial_frame() -> None:
    # Chunks that never end on a frame boundary, past the compaction threshold
    # several times over, so consumed bytes are dropped while a frame is split.
    msgs = [{"op": "m", "i": i, "pad": "p" * (i % 500)} for i in range(3000)]
    stream = encode_frames(msgs)
    decoder = FrameDecoder()
    out: list[dict[str, Any]] = []
    for i in range(0, len(stream), 100_003):
        out.extend(decoder.feed(stream[i : i + 100_003]))
    assert len(stream) > 3 * 256 * 1024
    assert out == msgs
    assert decoder.buffered == 0


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_frame_bytes=1000)
    # Only the header: the decoder must not wait for the body to refuse it.
    with pytest.raises(ProtocolError, match=r"1001 bytes is over the limit of 1000"):
        decoder.feed(struct.pack(">I", 1001))
    # And it stays failed.
    with pytest.raises(ProtocolError):
        decoder.feed(frame(b'{"op":"x"}'))


def test_exactly_the_limit_is_accepted() -> None:
    payload = b'{"op":"x","p":"' + b"a" * 100 + b'"}'
    decoder = FrameDecoder(max_frame_bytes=len(payload))
    assert decoder.feed(frame(payload)) == [{"op": "x", "p": "a" * 100}]


def test_text_where_a_header_should_be_is_named() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="not speaking the Coda protocol"):
        decoder.feed(b"GET / HTTP/1.1\r\n")


def test_zero_length_frame() -> None:
    with pytest.raises(ProtocolError, match="zero-length"):
        FrameDecoder().feed(struct.pack(">I", 0))


def test_garbage_payload() -> None:
    with pytest.raises(ProtocolError, match="not JSON") as info:
        FrameDecoder().feed(frame(b"\xff\xfe not json"))
    assert "xff" in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [b"[1, 2]", b'"op"', b"42", b"null", b"{}", b'{"op": 1}', b'{"op": ""}'],
)
def test_payload_that_is_not_a_message(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="not a message"):
        FrameDecoder().feed(frame(payload))


def test_good_frames_before_a_bad_one_are_delivered_first() -> None:
    decoder = FrameDecoder()
    data = frame(b'{"op":"a"}') + frame(b'{"op":"b"}') + frame(b"[]")
    assert decoder.feed(data) == [{"op": "a"}, {"op": "b"}]
    assert decoder.error is not None
    with pytest.raises(ProtocolError, match="not a message"):
        decoder.feed(b"")


@settings(max_examples=200)
@given(
    msg=messages_st,
    values=st.lists(json_values, max_size=4),
    cut=st.integers(min_value=0),
)
def test_raw_values_arrive_in_their_places_as_sent(
    msg: dict[str, Any], values: list[Any], cut: int
) -> None:
    msg = {**msg, "raws": [None] * len(values)}
    raw = [(["raws", n], orjson.dumps(v)) for n, v in enumerate(values)]
    stream = encode_frame({**msg, RAW: raw}) + encode_frame({"op": "next"})
    cut %= len(stream) + 1
    decoder = FrameDecoder(raw=True)
    got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
    assert [decoded(m) for m in got] == [{**msg, "raws": values}, {"op": "next"}]
    placed = got[0]["raws"]
    assert all(type(v) is orjson.Fragment for v in placed)
    # Passed on as they came: encoding the message again splices them in.
    assert orjson.loads(orjson.dumps(got[0])) == {**msg, "raws": values}


def test_raw_values_go_into_nested_places() -> None:
    msg = {"op": "commands", "commands": [{"type": "A"}, {"type": "B"}]}
    raw = [(["commands", 1, "args"], b'{"x": [1, "\\u00e9"]}')]
    (got,) = FrameDecoder(raw=True).feed(encode_frame({**msg, RAW: raw}))
    assert RAW not in got
    assert decoded(got) == {
        "op": "commands",
        "commands": [{"type": "A"}, {"type": "B", "args": {"x": [1, "\u00e9"]}}],
    }


@pytest.mark.parametrize("raw", ["0", [("r", b"1")], [(["r"], "1")], [(["r"],)], True])
def test_the_raw_key_holds_raw_values_or_the_message_is_refused(raw: Any) -> None:
    with pytest.raises(ProtocolError, match="reserved for raw values"):
        encode_frame({"op": "o", RAW: raw})


def test_a_decoder_without_raw_values_refuses_them_as_not_json() -> None:
    data = encode_frame({"op": "outcome", RAW: [(["result"], b"1")]})
    with pytest.raises(ProtocolError, match="not JSON"):
        FrameDecoder().feed(data)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            b'{"op":"o","$raw":[["r"]]}\x00{"a":',
            "the raw value for \\['r'\\] is not JSON",
        ),
        (b'{"op":"o","$raw":[["r"]]}\x00', "is not JSON"),
        (b'{"op":"o","$raw":[["r"]]}\x001\x002', "2 raw values"),
        (b'{"op":"o"}\x001', "1 raw values and '\\$raw' None"),
        (b'{"op":"o","$raw":[["a","b"]]}\x001', "not a place in the message"),
        (b'{"op":"o","l":[],"$raw":[["l",3]]}\x001', "not a place in the message"),
        (b'{"op":"o","$raw":[[]]}\x001', "not a place in the message"),
        (b'{"op":"o","$raw":[[5]]}\x001', "not a place in the message"),
        (b'{"op":"o","$raw":["r"]}\x001', "not a place in the message"),
    ],
)
def test_bad_raw_values_are_refused_with_what_is_wrong(
    body: bytes, problem: str
) -> None:
    decoder = FrameDecoder(raw=True)
    good = frame(b'{"op":"before"}')
    assert decoder.feed(good + frame(body)) == [{"op": "before"}]
    with pytest.raises(ProtocolError, match=problem):
        decoder.feed(b"")


def test_eof_mid_header_and_mid_body() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00")
    with pytest.raises(ProtocolError, match="after 2 of 4 bytes"):
        decoder.feed_eof()

    decoder = FrameDecoder()
    decoder.feed(frame(b'{"op":"whole"}') + struct.pack(">I", 100) + b"x" * 10)
    with pytest.raises(ProtocolError, match="after 14 of 104 bytes"):
        decoder.feed_eof()


# --- connections over real sockets ----------------------------------------


def test_messages_cross_a_socketpair_in_order() -> None:
    async def main() -> list[dict[str, Any] | None]:
        a, b = await socket_pair()
        a.send({"op": "one"})
        a.send_many([{"op": "two"}, {"op": "three", "x": [1]}])
        await a.drain()
        await a.close()
        received = [await b.recv() for _ in range(4)]
        await b.close()
        return received

    assert run(main()) == [
        {"op": "one"},
        {"op": "two"},
        {"op": "three", "x": [1]},
        None,
    ]


def test_send_without_drain_is_still_written() -> None:
    async def main() -> list[dict[str, Any]]:
        a, b = await socket_pair()
        for i in range(100):
            a.send({"op": "n", "i": i})  # never drained: the loop flushes
        received = [await b.recv() for _ in range(100)]
        await a.close()
        await b.close()
        return [m for m in received if m is not None]

    assert run(main()) == [{"op": "n", "i": i} for i in range(100)]


def test_clean_eof_gives_none_every_time() -> None:
    async def main() -> tuple[Any, Any, Any]:
        a, b = await socket_pair()
        a.send({"op": "last"})
        await a.close()
        async with b:
            return await b.recv(), await b.recv(), await b.recv()

    assert run(main()) == ({"op": "last"}, None, None)


def test_async_iteration_stops_at_eof() -> None:
    async def main() -> list[dict[str, Any]]:
        a, b = await socket_pair()
        a.send_many([{"op": "x", "i": i} for i in range(5)])
        await a.close()
        async with b:
            return [msg async for msg in b]

    assert run(main()) == [{"op": "x", "i": i} for i in range(5)]


def test_peer_vanishing_mid_frame() -> None:
    async def main() -> None:
        conn, peer = await raw_pair()
        peer.sendall(struct.pack(">I", 100) + b"x" * 10)
        peer.close()
        with pytest.raises(ProtocolError, match="mid-frame after 14 of 104 bytes"):
            await conn.recv()
        assert conn.closed

    run(main())


def test_oversized_frame_is_answered_with_an_error_and_a_close() -> None:
    async def main() -> list[dict[str, Any]]:
        conn, peer = await raw_pair(max_frame_bytes=1000)
        # The header alone, and the peer stays connected: recv must not wait
        # for a body that may never come.
        peer.sendall(struct.pack(">I", 5000))
        with pytest.raises(ProtocolError, match="5000 bytes is over the limit of 1000"):
            await conn.recv()
        assert conn.closed
        return await asyncio.to_thread(read_all, peer)

    [error] = run(main())
    assert error["op"] == "error"
    assert error["code"] == ERROR_FRAME
    assert "5000" in error["message"] and "1000" in error["message"]


def test_garbage_frame_is_answered_after_the_good_ones_are_delivered() -> None:
    async def main() -> tuple[list[Any], list[dict[str, Any]]]:
        conn, peer = await raw_pair()
        peer.sendall(frame(b'{"op":"ok"}') + frame(b"not json"))
        got = [await conn.recv()]
        with pytest.raises(ProtocolError, match="not JSON"):
            await conn.recv()
        return got, await asyncio.to_thread(read_all, peer)

    got, [error] = run(main())
    assert got == [{"op": "ok"}]
    assert error["code"] == ERROR_FRAME
    assert "not JSON" in error["message"]


def test_send_after_close_raises() -> None:
    async def main() -> None:
        a, b = await socket_pair()
        await a.close()
        with pytest.raises(ConnectionClosed):
            a.send({"op": "late"})
        await b.close()

    run(main())


class CountingReader(asyncio.StreamReader):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read(self, n: int = -1) -> bytes:
        self.reads += 1
        return await super().read(n)


def test_a_burst_of_frames_costs_few_reads() -> None:
    async def main() -> tuple[int, list[dict[str, Any]]]:
        reader = CountingReader()
        msgs = [{"op": "t", "i": i} for i in range(1000)]
        reader.feed_data(encode_frames(msgs))
        reader.feed_eof()
        ours, theirs = socket.socketpair()
        _, writer = await asyncio.open_connection(sock=ours)
        conn = Connection(reader, writer)
        out = [msg async for msg in conn]
        await conn.close()
        theirs.close()
        return reader.reads, out

    reads, out = run(main())
    assert out == [{"op": "t", "i": i} for i in range(1000)]
    # ~12 KB of frames in 64 KiB reads: one read for the data, one for EOF.
    assert reads == 2


# --- serve: messages handled in the transport's callback -----------------


class Handled:
    """A handler for `serve` that keeps what it was given, and whether each
    message was handled in the transport's callback (no task running) rather
    than by the serving task."""

    def __init__(self, conn: Connection, stop_at: str = "", fail_at: str = "") -> None:
        self.conn = conn
        self.stop_at = stop_at
        self.fail_at = fail_at
        self.messages: list[dict[str, Any]] = []
        self.in_callback: list[bool] = []

    def __call__(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        self.in_callback.append(asyncio.current_task() is None)
        if msg["op"] == self.stop_at:
            self.conn.stop_serving()
        if msg["op"] == self.fail_at:
            raise ValueError(f"cannot handle {msg}")

    def ops(self) -> list[str]:
        return [m["op"] for m in self.messages]


async def serving(conn: Connection, handler: Handled) -> asyncio.Task[None]:
    """`conn.serve(handler)` in a task, once it waits for bytes to be pushed."""
    task = asyncio.create_task(conn.serve(handler))
    await asyncio.sleep(0.01)
    assert not task.done()
    return task


def ops_frames(*ops: str) -> bytes:
    return encode_frames([{"op": op} for op in ops])


def test_serve_handles_each_message_in_the_callback_in_order() -> None:
    msgs = [{"op": "m", "i": i, "pad": "p" * (i * 7 % 300)} for i in range(500)]
    stream = encode_frames(msgs)

    async def main() -> Handled:
        conn, peer = await raw_pair()
        handled = Handled(conn)
        task = await serving(conn, handled)
        # The first frames a few bytes at a time, headers and bodies split
        # across chunks; then the rest, hundreds of frames in a chunk.
        pos = 0
        for size in [1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37] * 20:
            peer.sendall(stream[pos : pos + size])
            pos += size
            await asyncio.sleep(0)
        await asyncio.to_thread(peer.sendall, stream[pos:])
        peer.close()
        assert await task is None  # a clean end of stream
        assert await conn.recv() is None
        return handled

    handled = run(main())
    assert handled.messages == msgs
    assert all(handled.in_callback)


def test_serve_takes_a_burst_with_a_frame_at_the_limit() -> None:
    limit = 4 * 1024 * 1024
    empty = len(orjson.dumps({"op": "big", "x": ""}))
    big = {"op": "big", "x": "y" * (limit - empty)}
    msgs = [
        *({"op": "s", "i": i} for i in range(20_000)),
        big,
        *({"op": "s", "i": i} for i in range(1000)),
    ]
    stream = encode_frames(msgs, max_frame_bytes=limit)

    async def main() -> Handled:
        conn, peer = await raw_pair(max_frame_bytes=limit)
        handled = Handled(conn)
        task = await serving(conn, handled)
        await asyncio.to_thread(peer.sendall, stream)
        peer.close()
        await task
        return handled

    handled = run(main())
    assert len(handled.messages) == len(msgs)
    assert handled.messages == msgs
    assert all(handled.in_callback)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (frame(b"not json"), "not JSON"),
        (struct.pack(">I", 5000), "5000 bytes is over the limit of 1000"),
    ],
)
def test_serve_handles_the_good_frames_then_answers_a_bad_one(
    bad: bytes, error: str
) -> None:
    async def main() -> tuple[Handled, list[dict[str, Any]]]:
        conn, peer = await raw_pair(max_frame_bytes=1000)
        handled = Handled(conn)
        task = await serving(conn, handled)
        # In one chunk, and the peer stays connected: a bad length header is
        # refused without waiting for its body.
        peer.sendall(ops_frames("one", "two") + bad + ops_frames("never"))
        with pytest.raises(ProtocolError, match=error):
            await task
        assert conn.closed
        return handled, await asyncio.to_thread(read_all, peer)

    handled, [answer] = run(main())
    assert handled.ops() == ["one", "two"]
    assert all(handled.in_callback)
    assert answer["op"] == "error" and answer["code"] == ERROR_FRAME
    assert error.split()[0] in answer["message"]


def test_serve_peer_vanishing_mid_frame() -> None:
    async def main() -> Handled:
        conn, peer = await raw_pair()
        handled = Handled(conn)
        task = await serving(conn, handled)
        peer.sendall(ops_frames("whole") + struct.pack(">I", 100) + b"x" * 10)
        await asyncio.sleep(0.01)
        peer.close()
        with pytest.raises(ProtocolError, match="mid-frame after 14 of 104 bytes"):
            await task
        assert conn.closed
        return handled

    handled = run(main())
    assert handled.ops() == ["whole"]


def test_serve_returns_when_the_connection_is_closed_on_our_side() -> None:
    async def main() -> None:
        a, b = await socket_pair()
        handled = Handled(b)
        task = await serving(b, handled)
        a.send({"op": "before"})
        await a.drain()
        await asyncio.sleep(0.01)
        await b.close()
        assert await task is None
        assert handled.ops() == ["before"]
        await a.close()

    run(main())


def test_switching_from_recv_to_serve_loses_nothing() -> None:
    many = [{"op": "m", "i": i, "pad": "p" * 100} for i in range(20_000)]
    stream = encode_frames([{"op": "hello"}, *many, {"op": "last"}])
    first = len(encode_frame({"op": "hello"})) + 300

    async def main() -> Handled:
        conn, peer = await raw_pair()
        peer.sendall(stream[:first])
        assert await conn.recv() == {"op": "hello"}
        # Decoded messages and a partial frame are left in the connection;
        # then more arrives while nobody reads, far more than the
        # StreamReader holds before it stops reading the socket.
        sending = asyncio.create_task(asyncio.to_thread(peer.sendall, stream[first:]))
        await asyncio.sleep(0.1)
        handled = Handled(conn)
        task = asyncio.create_task(conn.serve(handled))
        await sending
        peer.close()
        await task
        return handled

    handled = run(main())
    assert handled.messages == [*many, {"op": "last"}]
    # What was there before is handled by `serve` itself; the rest in the
    # callback once the reader's backlog is gone.
    assert not handled.in_callback[0] and handled.in_callback[-1]


@pytest.mark.parametrize("ending", ["stop", "fail"])
def test_serve_ended_by_its_handler_leaves_the_rest_for_recv(ending: str) -> None:
    async def main() -> tuple[Handled, list[Any]]:
        conn, peer = await raw_pair()
        handled = Handled(conn, stop_at="stop", fail_at="fail")
        task = await serving(conn, handled)
        peer.sendall(ops_frames("one", ending, "after", "later"))
        if ending == "fail":
            with pytest.raises(ValueError, match="cannot handle"):
                await task
        else:
            assert await task is None
        # The connection lives on and the rest of the chunk waits for `recv`;
        # bytes sent now go to the reader again.
        assert not conn.closed
        rest = [await conn.recv(), await conn.recv()]
        peer.sendall(ops_frames("again"))
        rest.append(await conn.recv())
        # Served again, messages are handled in the callback again.
        task = await serving(conn, handled)
        peer.sendall(ops_frames("last"))
        peer.close()
        await task
        return handled, rest

    handled, rest = run(main())
    assert handled.ops() == ["one", ending, "last"]
    assert all(handled.in_callback)
    assert rest == [{"op": "after"}, {"op": "later"}, {"op": "again"}]


def test_serve_on_a_plain_connection_reads_with_recv() -> None:
    async def main() -> Handled:
        reader = asyncio.StreamReader()
        reader.feed_data(ops_frames("one", "two"))
        reader.feed_eof()
        ours, theirs = socket.socketpair()
        _, writer = await asyncio.open_connection(sock=ours)
        conn = Connection(reader, writer)
        handled = Handled(conn)
        await conn.serve(handled)
        await conn.close()
        theirs.close()
        return handled

    handled = run(main())
    assert handled.ops() == ["one", "two"]
    assert not any(handled.in_callback)


# --- handshake -------------------------------------------------------------


def handshake(
    client: Callable[[Connection], Awaitable[Any]],
    server: Callable[[Connection], Awaitable[Any]],
) -> tuple[Any, Any]:
    """Run both sides on a socketpair; each result is a value or an exception."""

    async def main() -> tuple[Any, Any]:
        a, b = await socket_pair()
        results = await asyncio.gather(client(a), server(b), return_exceptions=True)
        await a.close()
        await b.close()
        return results[0], results[1]

    result: tuple[Any, Any] = run(main())
    return result


def test_handshake_ok() -> None:
    welcome, hello = handshake(
        lambda c: client_handshake(c, "worker", pid=1234, token="s3cret"),
        lambda s: server_handshake(s, token="s3cret", worker_id=7),
    )
    assert welcome == {"op": "welcome", "protocol": PROTOCOL_VERSION, "worker_id": 7}
    assert hello == {
        "op": "hello",
        "protocol": PROTOCOL_VERSION,
        "role": "worker",
        "pid": 1234,
    }  # the token is removed from what the server gets back


def test_handshake_without_a_server_token_ignores_none() -> None:
    welcome, hello = handshake(
        lambda c: client_handshake(c, "client"),
        lambda s: server_handshake(s),
    )
    assert welcome["op"] == "welcome"
    assert hello["role"] == "client"


def test_version_mismatch_is_sent_then_closed() -> None:
    async def main() -> tuple[list[dict[str, Any]], BaseException]:
        conn, peer = await raw_pair()
        hello = {"op": "hello", "protocol": PROTOCOL_VERSION + 1, "role": "client"}
        peer.sendall(encode_frame(hello))
        with pytest.raises(ProtocolError) as info:
            await server_handshake(conn)
        return await asyncio.to_thread(read_all, peer), info.value

    [error], exc = run(main())
    assert error["code"] == ERROR_VERSION
    assert (
        f"client speaks protocol {PROTOCOL_VERSION + 1}, this supervisor speaks "
        f"{PROTOCOL_VERSION}" in error["message"]
    )
    assert "upgrade Coda on the supervisor side" in error["message"]
    assert "version" in str(exc)


def test_client_sees_a_version_refusal_as_handshake_refused() -> None:
    async def old_supervisor(conn: Connection) -> None:
        await conn.recv()
        await conn.close_with_error(ERROR_VERSION, "client speaks protocol 1, ...")

    refused, _ = handshake(lambda c: client_handshake(c, "client"), old_supervisor)
    assert isinstance(refused, HandshakeRefused)
    assert refused.code == ERROR_VERSION
    assert "client speaks protocol 1" in str(refused)


@pytest.mark.parametrize(
    ("sent", "reason"),
    [({}, "carried none"), ({"token": "wrong"}, "does not match")],
)
def test_bad_token(sent: dict[str, Any], reason: str) -> None:
    refused, server_error = handshake(
        lambda c: client_handshake(c, "client", **sent),
        lambda s: server_handshake(s, token="right"),
    )
    assert isinstance(refused, HandshakeRefused)
    assert refused.code == ERROR_AUTH
    assert reason in refused.remote_message
    assert "right" not in refused.remote_message
    assert isinstance(server_error, ProtocolError)


def test_first_message_not_a_hello() -> None:
    async def main() -> list[dict[str, Any]]:
        conn, peer = await raw_pair()
        peer.sendall(encode_frame({"op": "submit", "workflow": "x"}))
        with pytest.raises(ProtocolError, match="must be a hello"):
            await server_handshake(conn)
        return await asyncio.to_thread(read_all, peer)

    [error] = run(main())
    assert error["code"] == ERROR_HANDSHAKE
    assert "'submit'" in error["message"]


def test_role_not_accepted_here() -> None:
    refused, _ = handshake(
        lambda c: client_handshake(c, "worker"),
        lambda s: server_handshake(s, roles=("client",)),
    )
    assert isinstance(refused, HandshakeRefused)
    assert refused.code == ERROR_HANDSHAKE
    assert "'worker'" in refused.remote_message


def test_server_times_out_waiting_for_hello() -> None:
    async def main() -> list[dict[str, Any]]:
        conn, peer = await raw_pair()
        with pytest.raises(ProtocolError, match=r"no hello within 0.2 s"):
            await server_handshake(conn, timeout=0.2)
        return await asyncio.to_thread(read_all, peer)

    [error] = run(main())
    assert error["code"] == ERROR_HANDSHAKE


def test_client_times_out_waiting_for_welcome() -> None:
    async def silent(conn: Connection) -> None:
        await conn.recv()
        await asyncio.sleep(1)

    elapsed = 0.0

    async def client(conn: Connection) -> Any:
        nonlocal elapsed
        start = asyncio.get_running_loop().time()
        try:
            return await client_handshake(conn, "client", timeout=0.2)
        finally:
            elapsed = asyncio.get_running_loop().time() - start

    error, _ = handshake(client, silent)
    assert isinstance(error, ProtocolError)
    assert 0.15 < elapsed < 0.9  # gave up on its own deadline, not the server's
    assert "within 0.2 s" in str(error)


def test_client_refuses_a_reply_that_is_not_a_welcome() -> None:
    async def confused(conn: Connection) -> Any:
        await conn.recv()
        conn.send({"op": "result", "value": 1})
        await conn.drain()
        return await conn.recv()

    error, server_saw = handshake(lambda c: client_handshake(c, "client"), confused)
    assert isinstance(error, ProtocolError)
    assert "'result'" in str(error)
    assert server_saw["code"] == ERROR_HANDSHAKE


def test_handshake_over_a_unix_server(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")

    async def main() -> tuple[dict[str, Any], dict[str, Any] | None]:
        hellos: list[dict[str, Any]] = []

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            async with Connection(r, w, name="client") as conn:
                hellos.append(await server_handshake(conn, token="t"))
                async for msg in conn:
                    conn.send({"op": "echo", "of": msg})

        server = await asyncio.start_unix_server(serve, path)
        async with server:
            reader, writer = await asyncio.open_unix_connection(path)
            async with Connection(reader, writer, name="supervisor") as conn:
                welcome = await client_handshake(conn, "client", token="t")
                conn.send({"op": "ping"})
                echo = await conn.recv()
            assert hellos == [
                {"op": "hello", "protocol": PROTOCOL_VERSION, "role": "client"}
            ]
        return welcome, echo

    welcome, echo = run(main())
    assert welcome == {"op": "welcome", "protocol": PROTOCOL_VERSION}
    assert echo == {"op": "echo", "of": {"op": "ping"}}


def test_default_limit_is_64_mib() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 64 * 1024 * 1024
    with pytest.raises(ProtocolError, match=str(DEFAULT_MAX_FRAME_BYTES)):
        FrameDecoder().feed(struct.pack(">I", DEFAULT_MAX_FRAME_BYTES + 1))
