"""Received bytes handed over in the transport's callback: `Connection.serve`.

A StreamReader is read by a task: the bytes arrive in the transport's
``data_received`` callback, the reader stores them and wakes the task, and the
task takes them on the next turn of the event loop. A handler that is
synchronous anyway can be called from the callback itself, a turn sooner,
which on the supervisor's worker links is a dozen microseconds for every hop
of every message.

`PushProtocol` is the protocol under a connection made by
`coda.protocol.Connection.open` or `from_socket`, or accepted by a server
made with `serving`. It is a StreamReaderProtocol, wired up by `open_stream`
and `serving` the way `asyncio.open_connection` and `asyncio.start_server`
wire their own (whose docstrings say to copy them to customise the
protocol), and it overrides only callbacks of the public `asyncio.Protocol`
interface. While its connection
does not serve, it is a plain StreamReaderProtocol that counts what it gives
the reader. While it serves, the bytes go to the connection's ``on_data``
instead; the end of the stream still goes to the StreamReader as well as to
``on_end``, so that the StreamWriter's drain and close, which rely on the base
class, work unchanged, and so that `recv` finds the end there once pushing
stops. `Connection.serve` decides when to push and does the decoding.

Backpressure. While bytes are pushed, nothing is buffered but a partial frame:
the handlers of a chunk run before the next chunk is read, so reading goes at
their pace, as it did with a task that read only between messages. Before
pushing starts, `serve` has `recv` take everything the StreamReader holds,
which also resumes reading the socket if the StreamReader had paused it for
holding too much.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["ClientConnected", "Connect", "PushProtocol", "open_stream", "serving"]


class PushProtocol(asyncio.StreamReaderProtocol):
    """A StreamReaderProtocol that can hand received bytes to a callback."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
        client_connected_cb: ClientConnected | None = None,
    ) -> None:
        super().__init__(reader, client_connected_cb, loop=loop)
        self.on_data: Callable[[bytes], None] | None = None
        self.on_end: Callable[[], None] | None = None
        # What the StreamReader was given (bytes, and whether the stream
        # ended), so that its reader can tell whether a read would return at
        # once: StreamReader has no public way to say how much it holds.
        self.fed = 0
        self.ended = False

    def push_to(
        self, on_data: Callable[[bytes], None], on_end: Callable[[], None]
    ) -> None:
        """From now on give received bytes to `on_data`, and tell `on_end`
        (after the reader) when the stream ends."""
        self.on_data = on_data
        self.on_end = on_end

    def stop_pushing(self) -> None:
        """From now on give received bytes to the StreamReader again."""
        self.on_data = None
        self.on_end = None

    def data_received(self, data: bytes) -> None:
        on_data = self.on_data
        if on_data is not None:
            on_data(data)
            return
        self.fed += len(data)
        super().data_received(data)

    def eof_received(self) -> bool:
        self.ended = True
        keep_open = super().eof_received()
        if self.on_end is not None:
            self.on_end()
        return bool(keep_open)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        super().connection_lost(exc)
        if self.on_end is not None:
            self.on_end()


ClientConnected = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
]
Connect = Callable[
    [Callable[[], asyncio.Protocol]], Awaitable[tuple[asyncio.Transport, Any]]
]


async def open_stream(
    connect: Connect,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A (reader, writer) pair with a `PushProtocol` under it.

    `connect(factory)` is one of the loop's connecting methods with its
    address given, e.g. ``lambda f: loop.create_unix_connection(f, path)``.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = PushProtocol(reader, loop)
    transport, _ = await connect(lambda: protocol)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def serving(client_connected: ClientConnected) -> Callable[[], PushProtocol]:
    """The protocol factory for a server of the loop's (`create_unix_server`,
    `create_server`) that calls `client_connected(reader, writer)` for each
    connection, as `asyncio.start_server` does, with a `PushProtocol` under it.
    """

    def factory() -> PushProtocol:
        loop = asyncio.get_running_loop()
        return PushProtocol(asyncio.StreamReader(loop=loop), loop, client_connected)

    return factory
