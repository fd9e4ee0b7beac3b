"""The wire protocol: one framing and one handshake for every connection.

Theory of operation
-------------------
Three kinds of connection carry messages: a client to the supervisor over a
Unix socket (or TCP, opt-in), and the supervisor to each worker over a
socketpair. All three speak exactly what this module defines, so that the
supervisor has one reader, one writer and one set of failure modes to get
right.

Framing. A frame is a 4-byte big-endian unsigned length followed by that many
bytes of payload, and the payload is one JSON object with at least a string
``"op"``: a *message*. The length comes first so that a receiver knows how big
a frame is before it buffers any of it, and can refuse a frame over its limit
(64 MiB unless configured otherwise) on the strength of four bytes: a peer
cannot make the supervisor allocate what it likes, and a program that is not
Coda at all (an HTTP client pointed at the socket, say) is caught on its first
read rather than after the supervisor has waited for a gigabyte of body. JSON
is the same value model as the journal's, and it stays readable in a packet
capture or an strace. A zero-length frame, a payload that is not JSON, and
JSON that is not an object with an ``"op"`` are refused too.

Raw values. On a worker's link, a message may carry values already encoded
(a task's result, a command's arguments) as raw segments after its JSON, each
behind a NUL byte, which JSON text never holds: the message's ``"$raw"``
lists the place of each (a path of keys and indexes). The decoder puts each
in its place as an `orjson.Fragment`, checked to be JSON but not decoded: the
supervisor passes these values on (to the journal, to another worker, to a
client) and never looks inside them, and keeping them encoded spares it
decoding, re-encoding and holding as objects the larger part of every
message. A sender puts ``(path, bytes)`` pairs under ``"$raw"`` (`RAW`).

`FrameDecoder` is the framing with no I/O: bytes in, messages out. It keeps a
partial frame buffered across calls and decodes every complete frame of a chunk
in one pass, so a burst of thousands of small frames costs one read and one
call, not one per frame. `encode_frame` and `encode_frames` go the other way;
the second batches many messages into one write.

Errors. After a malformed frame nothing that follows on the stream can be
trusted: the next length header would be read from the middle of something
else, and resynchronising would be guessing. So a framing error ends the
connection, never the process: `Connection.recv` sends the peer one error
message (``{"op": "error", "code": ..., "message": ...}``) saying what was wrong,
closes, and raises `ProtocolError` for the caller to log. Messages that arrived
complete before the bad frame are still delivered first. A peer that vanishes
in the middle of a frame is a `ProtocolError` as well; one that closes between
frames is a clean end of stream, and `recv` returns None.

Reading. `Connection.recv` awaits the next message; `Connection.serve` hands
every message to a synchronous handler instead, exactly as a loop on `recv`
would, errors and end of stream included, and on a connection with a push
protocol under it (`Connection.open`, `from_socket`, a server made with
`coda._push.serving`) a turn of the event loop sooner for each message: the
bytes are decoded and handled in the transport's callback (see `coda._push`).
A connection starts with `recv` (the handshake) and may switch to `serve` and
back; nothing received in between is lost.

Handshake. The first message on every connection is the connecting side's
``hello``, carrying `PROTOCOL_VERSION` and its role (``"client"`` or
``"worker"``); the accepting side answers ``welcome`` or an error, and closes
after an error. Without it, a client from a newer Coda talking to an older
supervisor would fail later and obscurely, on some message the other side reads
differently; with it, the mismatch is one sentence at connect time that names
both versions and what to upgrade. A shared token, when the supervisor has one
(TCP beyond loopback), is checked here too, in constant time. Each side gives
the other a deadline (10 s by default), so a silent peer cannot hold a
connection open forever.

Writing. `Connection.send` encodes at once (so a bad message fails where it was
sent) but only queues the bytes; the queue is written in one go on the next
turn of the event loop, or by `drain`. A supervisor that sends a hundred
messages in one step of its loop makes one system call, not a hundred, with no
added latency and no way to forget a flush.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import socket
import struct
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeAlias

import orjson

from coda._push import Connect, PushProtocol, open_stream
from coda.errors import CodaError, ProtocolError, ValueNotJSON, ValueTooLarge

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_FRAME_BYTES",
    "ERROR_AUTH",
    "ERROR_CODES",
    "ERROR_FRAME",
    "ERROR_HANDSHAKE",
    "ERROR_INTERNAL",
    "ERROR_VERSION",
    "HEADER_BYTES",
    "PROTOCOL_VERSION",
    "RAW",
    "ROLES",
    "Connection",
    "ConnectionClosed",
    "FrameDecoder",
    "HandshakeRefused",
    "Message",
    "client_handshake",
    "encode_frame",
    "encode_frames",
    "error_message",
    "server_handshake",
]

logger = logging.getLogger(__name__)

Message: TypeAlias = dict[str, Any]
"""A decoded frame: a JSON object with at least a non-empty string ``"op"``."""

PROTOCOL_VERSION = 1
"""Bumped whenever a message changes so that an older peer would misread it."""

HEADER_BYTES = 4
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
READ_CHUNK_BYTES = 64 * 1024

ROLES = ("client", "worker")

RAW = "$raw"
"""The key of a message's raw values (see "Raw values")."""

# Error codes, the ``"code"`` of an ``{"op": "error"}`` message.
ERROR_FRAME = "frame"
"""A frame was oversized, empty, not JSON, or not an object with an ``"op"``."""
ERROR_HANDSHAKE = "handshake"
"""The first message was not a valid hello, or it did not come in time."""
ERROR_VERSION = "version"
"""The two sides speak different protocol versions."""
ERROR_AUTH = "auth"
"""The supervisor requires a shared token and the hello's was missing or wrong."""
ERROR_INTERNAL = "internal"
"""The sender hit a bug while handling a message; it is logged on its side."""
ERROR_CODES = frozenset(
    {ERROR_FRAME, ERROR_HANDSHAKE, ERROR_VERSION, ERROR_AUTH, ERROR_INTERNAL}
)

_HEADER = struct.Struct(">I")
_MAX_LENGTH = 2**32 - 1
# Compact the decoder's buffer once this many consumed bytes sit at its front.
_COMPACT_BYTES = 256 * 1024


class HandshakeRefused(ProtocolError):
    """The other side answered our hello with an error message.

    ``code`` is one of the ``ERROR_*`` constants (``"version"``, ``"auth"``, ...)
    and ``remote_message`` the other side's explanation, which says what to fix.
    """

    def __init__(self, code: str, remote_message: str) -> None:
        self.code = code
        self.remote_message = remote_message
        super().__init__(
            f"the supervisor refused the connection ({code}): {remote_message}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.remote_message))


class ConnectionClosed(CodaError, ConnectionError):
    """A message could not be sent because the connection is closed."""


def _check_limit(max_frame_bytes: int) -> int:
    if not 1 <= max_frame_bytes <= _MAX_LENGTH:
        raise ValueError(
            f"max_frame_bytes={max_frame_bytes} is outside 1..{_MAX_LENGTH}: a "
            "frame's length must fit its 4-byte header"
        )
    return max_frame_bytes


def _op_of(msg: object) -> str | None:
    """The message's op, or None when `msg` is not a dict with a non-empty one."""
    if type(msg) is not dict:
        return None
    op = msg.get("op")
    if type(op) is not str or not op:
        return None
    return op


def encode_frame(msg: Message, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """One message as one frame: its length, then its compact JSON.

    Raises `ProtocolError` if `msg` has no string ``"op"``, `ValueNotJSON` if it
    does not encode, and `ValueTooLarge` if it encodes to more than
    `max_frame_bytes`: the peer would refuse the frame and drop the connection,
    so it is better refused here, where the caller can see why.
    """
    op = _op_of(msg)
    if op is None:
        raise ProtocolError(
            f"cannot send {_preview(msg)}: a message is a dict with a non-empty "
            "string 'op'"
        )
    try:
        raw = msg.get(RAW)
        if raw is None:
            payload = orjson.dumps(msg)
        else:
            paths = _raw_paths(op, raw)
            if paths:
                payload = orjson.dumps({**msg, RAW: paths})
                payload += b"".join([b"\0" + value for _, value in raw])
            else:  # none after all: no "$raw" either
                payload = orjson.dumps({k: v for k, v in msg.items() if k != RAW})
    except orjson.JSONEncodeError as exc:
        raise ValueNotJSON(f"message {op!r} does not encode as JSON: {exc}") from exc
    if len(payload) > max_frame_bytes:
        raise ValueTooLarge(
            f"message {op!r} encodes to {len(payload)} bytes, over the frame limit "
            f"of {max_frame_bytes} bytes; send large values by reference, or raise "
            "the limit on both ends"
        )
    return _HEADER.pack(len(payload)) + payload


def _raw_paths(op: str, raw: Any) -> list[Any]:
    """The paths of a message's raw values to send; refuses anything else
    under the reserved key."""
    if type(raw) is list and all(
        type(item) is tuple
        and len(item) == 2
        and type(item[0]) is list
        and type(item[1]) is bytes
        for item in raw
    ):
        return [path for path, _ in raw]
    raise ProtocolError(
        f"cannot send message {op!r}: {RAW!r} is reserved for raw values, a "
        f"list of (path, JSON bytes) pairs, not {_preview(raw)}"
    )


def encode_frames(
    msgs: Iterable[Message], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> bytes:
    """Many messages as consecutive frames, ready for a single write."""
    return b"".join([encode_frame(msg, max_frame_bytes) for msg in msgs])


def error_message(code: str, message: str) -> Message:
    """The message that tells a peer what it did wrong, sent before closing."""
    return {"op": "error", "code": code, "message": message}


class FrameDecoder:
    """Turns a byte stream into messages; no I/O of its own.

    Feed it whatever arrived, in chunks of any size; it returns every message
    completed so far and keeps the rest. Once a frame has been refused the
    decoder stays failed: every later `feed` raises the same error.
    """

    def __init__(
        self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *, raw: bool = False
    ) -> None:
        self.max_frame_bytes = _check_limit(max_frame_bytes)
        self.raw = raw
        """Whether frames may carry raw values (see "Raw values")."""
        self.error: ProtocolError | None = None
        """The error that failed the decoder, once it has."""
        self._buffer = bytearray()
        # Bytes before `_offset` belong to frames already decoded. They are
        # dropped in one `del` when they add up to enough, or for free when the
        # whole buffer has been consumed, so a long stream of frames costs
        # linear time however it is chunked.
        self._offset = 0

    @property
    def buffered(self) -> int:
        """Bytes received that belong to a frame not yet complete."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add received bytes; return the messages they complete, in order.

        Raises `ProtocolError` for a bad frame. When good frames precede the bad
        one in the same chunk, they are returned and the error is raised by the
        next call, so that nothing a peer sent correctly is lost to what it sent
        wrong after it.
        """
        if self.error is not None:
            raise self.error
        buf = self._buffer
        buf += data
        end = len(buf)
        pos = self._offset
        limit = self.max_frame_bytes
        unpack_from = _HEADER.unpack_from
        loads = orjson.loads
        raw = self.raw
        messages: list[Message] = []
        try:
            while end - pos >= HEADER_BYTES:
                (length,) = unpack_from(buf, pos)
                # The length alone decides: an oversized frame is refused
                # before a byte of its body is waited for.
                if length > limit or length == 0:
                    raise ProtocolError(self._bad_length(buf, pos, length))
                start = pos + HEADER_BYTES
                if end - start < length:
                    break
                pos = start + length
                # JSON text holds no NUL byte: one starts the raw values.
                split = buf.find(0, start, pos) if raw else -1
                try:
                    msg = loads(buf[start:pos] if split < 0 else buf[start:split])
                except orjson.JSONDecodeError as exc:
                    raise ProtocolError(
                        f"frame of {length} bytes is not JSON ({exc}): "
                        f"{bytes(buf[start : start + 60])!r}"
                    ) from None
                if _op_of(msg) is None:
                    raise ProtocolError(
                        f"frame of {length} bytes is not a message (a JSON object "
                        f"with a non-empty string 'op'): {_preview(msg)}"
                    )
                if split >= 0:
                    _place_raw(msg, bytes(buf[split + 1 : pos]).split(b"\0"))
                messages.append(msg)
        except ProtocolError as exc:
            self.error = exc
            self._buffer = bytearray()
            self._offset = 0
            if messages:
                return messages
            raise

        if pos == end:
            buf.clear()
            self._offset = 0
        elif pos >= _COMPACT_BYTES:
            del buf[:pos]
            self._offset = 0
        else:
            self._offset = pos
        return messages

    def feed_eof(self) -> None:
        """The stream ended; raise `ProtocolError` if it ended inside a frame."""
        if self.error is not None:
            raise self.error
        have = self.buffered
        if have == 0:
            return
        if have < HEADER_BYTES:
            expected = HEADER_BYTES
        else:
            (length,) = _HEADER.unpack_from(self._buffer, self._offset)
            expected = HEADER_BYTES + length
        self.error = ProtocolError(
            f"connection closed mid-frame after {have} of {expected} bytes"
        )
        raise self.error

    def _bad_length(self, buf: bytearray, pos: int, length: int) -> str:
        if length == 0:
            return "zero-length frame: a frame carries one non-empty JSON message"
        text = (
            f"frame of {length} bytes is over the limit of {self.max_frame_bytes} bytes"
        )
        header = bytes(buf[pos : pos + HEADER_BYTES])
        if all(0x20 <= b < 0x7F for b in header):
            # Four printable bytes are far likelier to be text than a length.
            text += (
                f"; its length header reads {header!r}, so the peer is probably "
                "not speaking the Coda protocol"
            )
        return text


def _place_raw(msg: Message, values: list[bytes]) -> None:
    """Put each raw value of a message in the place its ``"$raw"`` names."""
    paths = msg.pop(RAW, None)
    if type(paths) is not list or len(paths) != len(values):
        raise ProtocolError(
            f"message {msg['op']!r} has {len(values)} raw values and "
            f"{RAW!r} {_preview(paths)}: one path for each is expected"
        )
    for path, value in zip(paths, values, strict=True):
        where: Any = msg
        try:
            if type(path) is not list:
                raise TypeError
            for key in path[:-1]:
                where = where[key]
            if type(where) is dict and type(path[-1]) is not str:
                raise TypeError
            orjson.loads(value)
            where[path[-1]] = orjson.Fragment(value)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(
                f"message {msg['op']!r}: the raw value for {path!r} is not JSON "
                f"({exc}): {value[:60]!r}"
            ) from None
        except (TypeError, KeyError, IndexError):
            raise ProtocolError(
                f"message {msg['op']!r}: {RAW!r} names {_preview(path)}, "
                "which is not a place in the message"
            ) from None


class Connection:
    """A message stream over an asyncio (reader, writer) pair.

    One task reads (`recv`, ``async for`` or `serve`); any code on the loop may
    send. ``name`` says who is on the other end, for log lines.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        name: str = "peer",
        raw: bool = False,
    ) -> None:
        """`serve` hands messages on a turn sooner if the writer's transport
        has a `PushProtocol` (`open`, `from_socket`, `coda._push.serving`).
        With `raw`, received messages may carry raw values."""
        self.reader = reader
        self.writer = writer
        self.name = name
        self.max_frame_bytes = _check_limit(max_frame_bytes)
        self._decoder = FrameDecoder(max_frame_bytes, raw=raw)
        self._received: collections.deque[Message] = collections.deque()
        self._outgoing: list[bytes] = []
        self._outgoing_bytes = 0
        self._flush_scheduled = False
        self._eof = False
        self._closed = False
        # Bytes `recv` has taken from the reader (see `PushProtocol.fed`).
        self._consumed = 0
        # The protocol that can push bytes to `serve`, if it is one.
        protocol = writer.transport.get_protocol()
        self._push = protocol if isinstance(protocol, PushProtocol) else None
        self._serving = False
        # The handler of the running `serve`, until `stop_serving`.
        self._handler: Callable[[Message], object] | None = None
        # Resolved when pushing stops (see `_serve_pushed`), and what a handler
        # raised meanwhile.
        self._push_ended: asyncio.Future[None] | None = None
        self._push_error: Exception | None = None

    @classmethod
    async def from_socket(cls, sock: socket.socket, **kwargs: Any) -> Connection:
        """Wrap a connected socket, e.g. one end of a socketpair.

        `serve` on such a connection handles each message a turn of the loop
        sooner than a loop on `recv` would.
        """
        return await cls.open(
            lambda factory: asyncio.get_running_loop().create_connection(
                factory, sock=sock
            ),
            **kwargs,
        )

    @classmethod
    async def open(cls, connect: Connect, **kwargs: Any) -> Connection:
        """Connect with `connect(factory)`, one of the loop's connecting
        methods with its address given; `serve` works as on `from_socket`."""
        reader, writer = await open_stream(connect)
        return cls(reader, writer, **kwargs)

    @property
    def closed(self) -> bool:
        return self._closed

    async def recv(self) -> Message | None:
        """The next message; None once the peer has closed between frames.

        Raises `ProtocolError` when the peer sends a bad frame (after telling it
        why and closing) or vanishes in the middle of one.
        """
        while not self._received:
            error = self._decoder.error
            if error is not None:
                # Raised by `feed` after the good messages before it were
                # delivered, or again to a caller that reads after an error.
                if not self._closed:
                    await self.close_with_error(ERROR_FRAME, str(error))
                raise error
            if self._eof:
                return None
            try:
                data = await self.reader.read(READ_CHUNK_BYTES)
            except ConnectionError:
                # A reset is the peer going away like any other: what matters
                # is whether it left a frame half sent.
                data = b""
            self._consumed += len(data)
            if not data:
                self._eof = True
                try:
                    self._decoder.feed_eof()
                except ProtocolError:
                    await self.close()
                    raise
                return None
            try:
                self._received.extend(self._decoder.feed(data))
            except ProtocolError as exc:
                await self.close_with_error(ERROR_FRAME, str(exc))
                raise
        return self._received.popleft()

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> Message:
        msg = await self.recv()
        if msg is None:
            raise StopAsyncIteration
        return msg

    async def serve(self, handler: Callable[[Message], object]) -> None:
        """Hand every message to `handler`, in order, until the stream ends.

        What ``async for msg in conn: handler(msg)`` does, but on a connection
        with a push protocol under it each message is handled a turn of the
        loop sooner: in the transport's callback, as soon as its bytes arrive.
        Returns when the peer closes between frames or `stop_serving` is
        called (by the handler, say). Raises what `recv` raises, in the same
        cases and after telling the peer, and what `handler` raises; in both
        cases after handling every message before the failure. Messages not
        handled stay for the next `recv` or `serve`.
        """
        if self._serving:
            raise RuntimeError(f"the connection to {self.name} is already served")
        self._serving = True
        self._handler = handler
        try:
            while self._handler is not None:
                if self._push is not None and not self._recv_ready(self._push):
                    await self._serve_pushed(self._push)
                    continue
                # Through `recv`: what was received before, and the end of
                # the stream, with what `recv` does about them.
                msg = await self.recv()
                if msg is None:
                    return
                if self._handler is None:
                    # Stopped while `recv` waited (on a plain connection).
                    self._received.appendleft(msg)
                    return
                handler(msg)
        finally:
            self._serving = False
            self._handler = None

    def stop_serving(self) -> None:
        """Make `serve` return without handling another message."""
        self._handler = None
        self._end_push()

    def _recv_ready(self, push: PushProtocol) -> bool:
        """Whether `recv` would return or raise without waiting for the peer."""
        return (
            bool(self._received)
            or self._decoder.error is not None
            or self._eof
            or push.ended
            or push.fed > self._consumed
        )

    async def _serve_pushed(self, push: PushProtocol) -> None:
        """Have `push` hand bytes to `_pushed` until the stream ends or fails,
        a handler raises, or `stop_serving`."""
        self._push_ended = ended = asyncio.get_running_loop().create_future()
        self._push_error = None
        push.push_to(self._pushed, self._end_push)
        try:
            await ended
        finally:
            push.stop_pushing()
            self._push_ended = None
        error, self._push_error = self._push_error, None
        if error is not None:
            raise error

    def _pushed(self, data: bytes) -> None:
        """Bytes pushed by the transport while serving: handle their messages."""
        received = self._received
        try:
            received.extend(self._decoder.feed(data))
        except ProtocolError:
            # `serve` goes back to `recv`, which says so to the peer.
            self._end_push()
            return
        while received:
            handler = self._handler
            if handler is None:
                return
            msg = received.popleft()
            try:
                handler(msg)
            except Exception as exc:
                # Raised out of `serve`; raised here it would make asyncio
                # close the transport as broken.
                self._end_push(exc)
                return
        if self._decoder.error is not None:
            # Good messages came before a bad frame: those are handled, and
            # `recv` raises the error.
            self._end_push()

    def _end_push(self, error: Exception | None = None) -> None:
        """Stop pushing: `serve` takes over on its next turn."""
        if self._push is not None:
            self._push.stop_pushing()
        if error is not None:
            self._push_error = error
        ended = self._push_ended
        if ended is not None and not ended.done():
            ended.set_result(None)

    def send(self, msg: Message) -> None:
        """Queue one message; it is written on the next turn of the loop.

        Raises at once if the message cannot be sent (see `encode_frame`).
        `drain` or `close` make sure it has left.
        """
        self._queue(encode_frame(msg, self.max_frame_bytes))

    def send_many(self, msgs: Iterable[Message]) -> None:
        """Queue several messages, to go out in the same write."""
        self._queue(encode_frames(msgs, self.max_frame_bytes))

    def _queue(self, frames: bytes) -> None:
        if self._closed:
            raise ConnectionClosed(f"cannot send to {self.name}: connection closed")
        self._outgoing.append(frames)
        self._outgoing_bytes += len(frames)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def flush(self) -> None:
        """Write what is queued now rather than at the end of this turn."""
        if self._outgoing:
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outgoing:
            return
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        self._outgoing_bytes = 0
        # After the peer has gone the transport drops writes; `drain` reports it.
        self.writer.write(data)

    def backlog(self) -> int:
        """Bytes queued for the peer and not yet taken by the kernel."""
        return self._outgoing_bytes + self.writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Write what is queued and wait until the transport has room again.

        Raises `ConnectionClosed` if the peer has gone.
        """
        self._flush()
        try:
            await self.writer.drain()
        except ConnectionError as exc:
            raise ConnectionClosed(
                f"cannot send to {self.name}: the connection was lost ({exc})"
            ) from exc

    async def close(self, timeout: float = 1.0) -> None:
        """Write what is queued, then close. Never raises; safe to call twice.

        `timeout` bounds the wait for a peer that has stopped reading, after
        which the connection is dropped with whatever was not yet written.
        """
        if self._closed:
            return
        self._flush()
        self._closed = True
        self.writer.close()
        try:
            async with asyncio.timeout(timeout):
                await self.writer.wait_closed()
        except (ConnectionError, TimeoutError):
            self.writer.transport.abort()

    async def close_with_error(
        self, code: str, message: str, timeout: float = 1.0
    ) -> None:
        """Tell the peer what went wrong, then close. Never raises."""
        logger.debug("closing connection to %s: %s: %s", self.name, code, message)
        if not self._closed:
            with contextlib.suppress(ConnectionError):
                self.send(error_message(code, message))
        await self.close(timeout)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def client_handshake(
    conn: Connection,
    role: str,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    **extra: Any,
) -> Message:
    """Say hello as `role`; return the supervisor's welcome.

    `extra` goes into the hello (``token=...`` for a supervisor that requires
    one). Raises `HandshakeRefused` if the supervisor answers with an error, and
    `ProtocolError` if it answers with anything else or not within `timeout`
    seconds; the connection is closed in every failing case.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    reserved = {"op", "protocol"} & extra.keys()
    if reserved:
        raise ValueError(f"hello fields {sorted(reserved)} are set by the handshake")

    try:
        async with asyncio.timeout(timeout):
            conn.send(
                {**extra, "op": "hello", "protocol": PROTOCOL_VERSION, "role": role}
            )
            await conn.drain()
            reply = await conn.recv()
    except TimeoutError:
        await conn.close()
        raise ProtocolError(
            f"no answer from {conn.name} to our hello within {timeout:g} s; is it "
            "a Coda supervisor, and is it overloaded?"
        ) from None
    except ConnectionClosed as exc:
        await conn.close()
        raise ProtocolError(f"{conn.name} closed the connection: {exc}") from exc

    if reply is None:
        await conn.close()
        raise ProtocolError(
            f"{conn.name} closed the connection without answering our hello"
        )
    if reply["op"] == "error":
        await conn.close()
        raise HandshakeRefused(str(reply.get("code")), str(reply.get("message")))
    if reply["op"] != "welcome":
        text = f"expected a welcome in answer to our hello, got {reply['op']!r}"
        await conn.close_with_error(ERROR_HANDSHAKE, text)
        raise ProtocolError(f"{conn.name}: {text}")
    if reply.get("protocol") != PROTOCOL_VERSION:
        text = (
            f"{conn.name} welcomed us with protocol {reply.get('protocol')!r} "
            f"after we said hello with {PROTOCOL_VERSION}"
        )
        await conn.close_with_error(ERROR_VERSION, text)
        raise ProtocolError(text)
    return reply


async def server_handshake(
    conn: Connection,
    *,
    token: str | None = None,
    roles: Collection[str] = ROLES,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    **extra: Any,
) -> Message:
    """Wait for the peer's hello, check it, answer welcome; return the hello.

    The hello must come within `timeout` seconds, speak `PROTOCOL_VERSION`,
    have one of `roles`, and carry `token` when one is given. Anything else is
    answered with an error message naming what to fix, the connection is
    closed, and `ProtocolError` raised. The returned hello has its token
    removed, so that it can be logged. `extra` goes into the welcome.
    """
    try:
        async with asyncio.timeout(timeout):
            hello = await conn.recv()
    except TimeoutError:
        text = f"no hello within {timeout:g} s of connecting"
        await conn.close_with_error(ERROR_HANDSHAKE, text)
        raise ProtocolError(f"{conn.name}: {text}") from None

    if hello is None:
        raise ProtocolError(f"{conn.name} closed the connection before its hello")
    refusal = _check_hello(hello, token, roles)
    if refusal is not None:
        code, text = refusal
        await conn.close_with_error(code, text)
        raise ProtocolError(f"refused {conn.name} ({code}): {text}")

    conn.send({**extra, "op": "welcome", "protocol": PROTOCOL_VERSION})
    try:
        await conn.drain()
    except ConnectionClosed as exc:
        raise ProtocolError(f"{conn.name} left during the handshake: {exc}") from exc
    hello.pop("token", None)
    return hello


def _check_hello(
    hello: Message, token: str | None, roles: Collection[str]
) -> tuple[str, str] | None:
    """The error code and message to refuse `hello` with, or None to accept it."""
    if hello["op"] != "hello":
        return ERROR_HANDSHAKE, (
            f"the first message must be a hello, got {hello['op']!r}; connect "
            "with coda.Client or the coda command"
        )

    # The version first: a newer peer may use roles or fields this one does
    # not know, and "upgrade" is the useful answer then.
    role = hello.get("role")
    peer = role if isinstance(role, str) and role in ROLES else "peer"
    version = hello.get("protocol")
    if type(version) is not int:
        return ERROR_HANDSHAKE, f"the hello has no integer 'protocol': {version!r}"
    if version != PROTOCOL_VERSION:
        older = "supervisor" if version > PROTOCOL_VERSION else peer
        return ERROR_VERSION, (
            f"{peer} speaks protocol {version}, this supervisor speaks "
            f"{PROTOCOL_VERSION}; upgrade Coda on the {older} side so that both "
            "ends run the same release"
        )

    if role not in roles:
        return ERROR_HANDSHAKE, (
            f"role {role!r} is not accepted here (expected "
            f"{' or '.join(map(repr, roles))})"
        )

    if token is not None:
        given = hello.get("token")
        if not isinstance(given, str):
            return ERROR_AUTH, (
                "this supervisor requires a token and the hello carried none; "
                "pass the token configured for the supervisor"
            )
        if not hmac.compare_digest(given.encode(), token.encode()):
            return ERROR_AUTH, "the token does not match the supervisor's"
    return None


def _preview(value: object, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
