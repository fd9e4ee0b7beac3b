"""`coda.Client`: submit runs to a supervisor, wait for results, read status.

    async with await coda.Client.connect(journal="coda.db") as client:
        run_id = await client.submit("process_event", {"project_id": 1, ...})
        result = await client.result(run_id)

The address is a Unix socket path (by default the one beside the journal:
`.coda/<journal file name>.sock`) or `tcp://host:port`. Several requests may be
in flight on one client; replies are matched to requests by id.

`SyncClient` wraps the same calls for code that has no event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import os
import socket
import threading
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from coda._push import Connect
from coda.definitions import WorkflowDef
from coda.errors import (
    CodaError,
    ProtocolError,
    RunCancelled,
    RunFailedError,
    RunIdConflict,
    RunNotFound,
    RunParkedError,
    UnknownNameError,
    ValueNotJSON,
)
from coda.journal import codec
from coda.journal.events import Event
from coda.protocol import Connection, client_handshake
from coda.values import check_value

__all__ = ["Client", "SyncClient", "default_socket_path"]

DEFAULT_JOURNAL = "coda.db"


def default_socket_path(journal: str | os.PathLike[str] = DEFAULT_JOURNAL) -> Path:
    """The supervisor's Unix socket for a journal: `.coda/NAME.sock` beside it.

    Beside the file itself: a journal named through a symlink finds the
    supervisor serving it under its real name (`coda run` locks that name).
    """
    path = Path(journal).resolve()
    return path.parent / ".coda" / f"{path.name}.sock"


class RequestError(CodaError):
    """The supervisor refused a request; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class Client:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._refused: RequestError | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls,
        address: str | os.PathLike[str] | None = None,
        *,
        journal: str | os.PathLike[str] | None = None,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> Client:
        """Connect to a supervisor; by default the one serving `journal`."""
        address = address or os.environ.get("CODA_ADDRESS")
        if address is None:
            address = default_socket_path(journal or DEFAULT_JOURNAL)
        target = str(address)
        loop = asyncio.get_running_loop()
        connect: Connect
        try:
            async with asyncio.timeout(timeout):
                if target.startswith("tcp://"):
                    host, _, port = target[len("tcp://") :].rpartition(":")
                    connect = functools.partial(
                        loop.create_connection, host=host, port=port
                    )
                else:
                    sock = await _unix_socket(target, timeout)
                    connect = functools.partial(loop.create_unix_connection, sock=sock)
                # A connection the replies are handed on from as they arrive
                # (`Connection.serve`), a turn of the loop sooner.
                conn = await Connection.open(connect, name=f"supervisor at {target}")
        except (OSError, TimeoutError) as exc:
            raise _unreachable(target, exc, timeout) from exc
        try:
            if token:
                await client_handshake(conn, "client", token=token)
            else:
                await client_handshake(conn, "client")
        except OSError as exc:
            # The link itself failed under the hello (a route gone, say), which
            # the handshake's closing re-raises; a supervisor that hung up or
            # answered wrong is a ProtocolError, raised as it is.
            conn.writer.transport.abort()
            raise _unreachable(target, exc, timeout) from exc
        return cls(conn)

    async def close(self) -> None:
        self._reader.cancel()
        await self._conn.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> None:
        error: BaseException = ProtocolError("the supervisor closed the connection")
        try:
            await self._conn.serve(self._on_reply)
            error = self._refused or error
        except ProtocolError as exc:
            error = exc
        except asyncio.CancelledError:
            # `close`: the requests still waiting would never be answered.
            error = ProtocolError("the client was closed")
            raise
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()

    def _on_reply(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            # The reply to a request; one whose caller gave up is dropped,
            # an error included.
            future = self._pending.pop(msg["id"], None)
            if future is not None and not future.done():
                future.set_result(msg)
        elif msg["op"] == "error":
            # An error that answers no request: the supervisor refuses the
            # connection, and every request waiting fails with it.
            self._refused = RequestError(str(msg.get("code")), str(msg.get("message")))
            self._conn.stop_serving()

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        if self._reader.done():
            raise ProtocolError("the connection to the supervisor is closed")
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[request_id] = future
        self._conn.send({"op": op, "id": request_id, **fields})
        reply = await future
        if reply["op"] == "error":
            code, message = str(reply.get("code")), str(reply.get("message"))
            if code == "not-found":
                raise (UnknownNameError if "workflow" in message else RunNotFound)(
                    message
                )
            if code == "conflict":
                raise RunIdConflict(message)
            raise RequestError(code, message)
        return reply

    # The calls.

    async def submit(
        self,
        workflow: str | WorkflowDef[..., Any],
        args: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> str:
        """Start a run; with a `run_id` already used, return that run instead."""
        name = workflow.name if isinstance(workflow, WorkflowDef) else workflow
        args = _args_object(args, name)
        reply = await self.request("submit", workflow=name, args=args, run_id=run_id)
        return str(reply["run_id"])

    async def run(
        self,
        workflow: str | WorkflowDef[..., Any],
        args: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Submit a run and wait for its result, in one round trip.

        Raises like `result`: `RunFailedError`, `RunCancelled`, `RunParkedError`.
        """
        name = workflow.name if isinstance(workflow, WorkflowDef) else workflow
        args = _args_object(args, name)
        what = f"run {run_id}" if run_id else f"the run of {name}"
        async with _within(timeout, what):
            summary = await self.request(
                "submit", workflow=name, args=args, run_id=run_id, wait=True
            )
        return result_of(summary)

    async def wait(self, run_id: str) -> dict[str, Any]:
        """Wait until the run is finished (or parked); return its summary."""
        return await self.request("wait", run_id=run_id)

    async def result(self, run_id: str, timeout: float | None = None) -> Any:
        """The run's result; raises if it failed, was cancelled or is parked."""
        async with _within(timeout, f"run {run_id}"):
            summary = await self.wait(run_id)
        return result_of(summary)

    async def status(self, run_id: str) -> dict[str, Any]:
        return await self.request("status", run_id=run_id)

    async def cancel(self, run_id: str, reason: str = "") -> bool:
        return bool(
            (await self.request("cancel", run_id=run_id, reason=reason))["changed"]
        )

    async def retry(self, run_id: str, reason: str = "") -> bool:
        return bool(
            (await self.request("retry", run_id=run_id, reason=reason))["changed"]
        )

    async def resume(self, run_id: str, reason: str = "") -> bool:
        return bool(
            (await self.request("resume", run_id=run_id, reason=reason))["changed"]
        )

    async def runs(
        self, status: str | None = None, workflow: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Summaries of runs, newest first. A result of more than 64 Ki
        characters is left out (`"result": None, "result_left_out": True`):
        `status` of that run has it."""
        reply = await self.request(
            "list", status=status, workflow=workflow, limit=limit
        )
        runs: list[dict[str, Any]] = reply["runs"]
        return runs

    async def history(self, run_id: str) -> list[Event]:
        reply = await self.request("history", run_id=run_id)
        return [codec.decode_dict(e) for e in reply["events"]]

    async def stats(self) -> dict[str, Any]:
        return await self.request("stats")


def _unreachable(target: str, exc: BaseException, timeout: float) -> CodaError:
    why = str(exc) or f"no connection within {timeout:g} s"
    return CodaError(
        f"cannot reach a supervisor at {target}: {why}. Is `coda run` running "
        "for this journal? (--journal, --address or CODA_ADDRESS)"
    )


async def _unix_socket(path: str, timeout: float) -> socket.socket:
    """A socket connected to the Unix socket `path`, waiting its turn to be.

    While the supervisor's queue of connections not yet accepted is full (a
    burst of clients, a flood), connecting fails at once with EAGAIN instead
    of waiting as a TCP connection would. asyncio would take that for a
    connection in progress, then for a connection made, and the hello would
    fail with ENOTCONN: so the socket is connected here, tried again with a
    growing pause until `timeout`.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.001
    try:
        while True:
            try:
                sock.connect(path)
            except BlockingIOError:
                if loop.time() + pause > deadline:
                    raise BlockingIOError(
                        errno.EAGAIN,
                        f"its queue of connections stayed full for {timeout:g} s; "
                        "it is overloaded or stopped",
                    ) from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
            else:
                return sock
    except BaseException:
        sock.close()
        raise


def result_of(summary: dict[str, Any]) -> Any:
    status = summary["status"]
    run_id = summary["run_id"]
    if status == "completed":
        return summary["result"]
    error = summary.get("error") or {}
    if status == "failed":
        raise RunFailedError(
            run_id,
            str(error.get("type")),
            str(error.get("message")),
            str(error.get("traceback", "")),
        )
    if status == "cancelled":
        raise RunCancelled(f"run {run_id} was cancelled")
    if status == "parked":
        raise RunParkedError(run_id, str(error.get("message")))
    raise CodaError(f"run {run_id} is {status}, not finished")


class SyncClient:
    """The same calls as `Client`, for code without an event loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._client = self._loop.run_until_complete(
                Client.connect(*args, **kwargs)
            )
        except BaseException:
            self._loop.close()
            raise
        # A client a script drops without `close` is closed when collected or
        # at exit: otherwise its reading task is destroyed pending, and
        # asyncio says so on stderr.
        self._close = weakref.finalize(self, _close_sync, self._loop, self._client)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run_until_complete(method(*args, **kwargs))

        return call

    def close(self) -> None:
        self._close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_sync(loop: asyncio.AbstractEventLoop, client: Client) -> None:
    def close() -> None:
        try:
            loop.run_until_complete(client.close())
        finally:
            loop.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        close()
        return
    # Collected while another event loop runs in this thread (the garbage
    # collector runs wherever it is triggered), which cannot run this one.
    closing = threading.Thread(target=close, name="coda-sync-client-close")
    closing.start()
    closing.join()


def _args_object(args: Any, workflow: str) -> dict[str, Any]:
    """A submission's arguments, checked here with their path named: on the wire
    a NaN would become null and a tuple a list without anyone noticing."""
    if args is None:
        return {}
    where = f"args of workflow {workflow}"
    if not isinstance(args, dict):
        raise ValueNotJSON(
            f"{where}: a workflow's arguments are a dict of its parameters, "
            f"not a {type(args).__name__}"
        )
    check_value(args, where)
    return args


@contextlib.asynccontextmanager
async def _within(timeout: float | None, what: str) -> AsyncIterator[None]:
    """`asyncio.timeout`, its TimeoutError saying what did not finish."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise TimeoutError(
            f"{what} did not finish within {timeout:g} s; it goes on (wait for "
            "it again, or cancel it)"
        ) from None
