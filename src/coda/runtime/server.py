"""The supervisor's door for clients: a Unix socket, and TCP when asked.

Requests and replies (every request may carry an "id", echoed in its reply, so
a client can have several requests in flight on one connection):

    {"op": "submit", "workflow": name, "args": {...}, "run_id": id | null}
        -> {"op": "submitted", "run_id": id, "created": bool}
    with "wait": true, the reply comes when the run is finished or parked:
        -> {"op": "run", ...summary, "created": bool}
    {"op": "wait", "run_id": id}          -> {"op": "run", ...summary}
    {"op": "status", "run_id": id}        -> {"op": "run", ...summary}
    {"op": "cancel" | "retry" | "resume", "run_id": id, "reason": str}
        -> {"op": "done", "changed": bool}
    {"op": "list", "status": s, "workflow": w, "limit": n}
        -> {"op": "runs", "runs": [summary, ...]}
    {"op": "history", "run_id": id}       -> {"op": "history", "events": [...]}
    {"op": "stats"}                       -> {"op": "stats", ...}

A request that is well-formed but asks for something impossible (an unknown
workflow, a run that does not exist) gets {"op": "error", "code": ..., ...} and
the connection stays open. A frame that is malformed or too large, or a message
with an unknown op, gets an error and the connection is closed: a peer that
does not speak the protocol cannot be trusted with the next frame. Either way
the supervisor goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import re
from pathlib import Path
from typing import Any

import attrs
import orjson

from coda._push import serving
from coda.errors import (
    CodaError,
    ProtocolError,
    RunIdConflict,
    RunNotFound,
    UnknownNameError,
    ValueNotJSON,
    ValueTooLarge,
)
from coda.journal import codec
from coda.journal.base import RESULT_LEFT_OUT, RunSummary
from coda.protocol import Connection, ConnectionClosed, server_handshake
from coda.runtime import faults
from coda.runtime.supervisor import Supervisor
from coda.runtime.wire import encode_error
from coda.values import check_json, check_size

__all__ = ["ClientServer", "summary_dict"]

logger = logging.getLogger(__name__)

# Replies a client may leave unread before its next request waits: requests
# for large results, sent and never read, would otherwise pile their replies
# up in the supervisor's memory.
_REPLY_BACKLOG_BYTES = 16 * 1024 * 1024
# Requests whose replies are read from the journal and may each be as large as
# a frame (a history, a run's result): at most `_READING[op]` of one client's
# at once. Without it a client sending many before reading any had them all
# read before the first reply counted against the backlog (20 histories of
# 6 MB). A wait is one when it is not answered by callbacks (`_answer_now`):
# its run is not live here, and its summary, result included, comes from the
# journal. Waits get more places: a client waiting for thousands of runs that
# have finished (W2's pattern) would otherwise have them read four at a time,
# W2 measured 4,454 -> 3,189 runs/s; a result is at most the value limit.
_READING = {"history": 4, "status": 4, "list": 4, "wait": 256}
# Replies are also held back while a client's backlog is over the limit
# (`_room`): a thousand waits for one run with a large result, answered when
# it ends, would otherwise all be encoded at once, each a copy of the result.
# A summary read from the journal for a wait or a status leaves out a result
# of more than `_SMALL_RESULT_CHARS`; such a result is read only once its
# client has room, and `_LARGE_READS` at a time in all: 256 waits of one
# client for a finished run with a 16 MB result were 4.3 GB of memory.
_SMALL_RESULT_CHARS = 64 * 1024
_LARGE_READS = 2

# sockaddr_un holds 108 bytes on Linux, the terminating NUL included.
_MAX_UNIX_PATH = 107

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


class BadRequest(CodaError, ValueError):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def summary_dict(summary: RunSummary) -> dict[str, Any]:
    body = attrs.asdict(summary, recurse=False)
    body["error"] = encode_error(summary.error) if summary.error else None
    if summary.result is RESULT_LEFT_OUT:
        body["result"], body["result_left_out"] = None, True
    return body


class RunIds:
    """Random run ids in uuid4's form (32 hex digits), 256 per system call.

    `uuid.uuid4()` asks the kernel for 16 random bytes each time and builds a
    UUID object to print it: 3 % of the supervisor's time when thousands of
    runs are submitted at once. The bytes come from the same source here, in
    larger helpings.
    """

    BATCH = 256

    def __init__(self) -> None:
        self._bytes = b""
        self._used = 0

    def next(self) -> str:
        if self._used >= len(self._bytes):
            self._bytes, self._used = os.urandom(16 * self.BATCH), 0
        raw = bytearray(self._bytes[self._used : self._used + 16])
        self._used += 16
        raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
        return raw.hex()


class ClientServer:
    def __init__(
        self,
        supervisor: Supervisor,
        *,
        socket_path: Path | None,
        tcp: tuple[str, int] | None = None,
        token: str | None = None,
        max_frame_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.supervisor = supervisor
        self._new_ids = RunIds()
        self.socket_path = socket_path
        self.tcp = tcp
        self.token = token
        self.max_frame_bytes = max_frame_bytes
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self._answers: set[asyncio.Future[None]] = set()
        self._large_reads = asyncio.Semaphore(_LARGE_READS)

    async def start(self) -> None:
        if self.socket_path is not None:
            if len(os.fsencode(self.socket_path)) > _MAX_UNIX_PATH:
                raise CodaError(
                    f"the client socket path {self.socket_path} is longer than a "
                    f"Unix socket allows ({_MAX_UNIX_PATH} bytes); pass a shorter "
                    "--socket, e.g. /tmp/coda-<name>.sock"
                )
            self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.socket_path.exists():
                self.socket_path.unlink()  # left by a supervisor that died
            # Create the socket 0600 from the start: no window where others
            # could connect.
            old = os.umask(0o177)
            try:
                server = await asyncio.get_running_loop().create_unix_server(
                    serving(self._serve), path=str(self.socket_path)
                )
            finally:
                os.umask(old)
            self._servers.append(server)
        if self.tcp is not None:
            host, port = self.tcp
            if self.token is None and not _is_loopback(host):
                raise CodaError(
                    f"refusing to listen on {host}:{port} without a token: anyone on "
                    "the network could submit work. Set --token, or use 127.0.0.1"
                )
            server = await asyncio.get_running_loop().create_server(
                serving(self._serve), host, port
            )
            self._servers.append(server)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in [*self._connections, *self._answers]:
            task.cancel()
        for server in self._servers:
            await server.wait_closed()
        if self.socket_path is not None and self.socket_path.exists():
            self.socket_path.unlink()

    def tcp_port(self) -> int | None:
        for server in self._servers:
            for sock in getattr(server, "sockets", ()):
                if sock.family.name.startswith("AF_INET"):
                    port: int = sock.getsockname()[1]
                    return port
        return None

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        conn = Connection(
            reader, writer, name="client", max_frame_bytes=self.max_frame_bytes
        )
        pending: set[asyncio.Task[None]] = set()
        # Replies being read from the journal: not queued yet, so not in the
        # backlog, and each may be as large as a frame.
        reading: dict[str, set[asyncio.Task[None]]] = {op: set() for op in _READING}
        # Why reading stopped before the client closed: the unknown op a
        # client sent, or "" for its replies piling up.
        stopped: list[str] = []

        def on_request(msg: dict[str, Any]) -> None:
            # In the transport's callback, as each request arrives.
            op = msg["op"]
            if op not in _OPS:
                stopped.append(op)
                conn.stop_serving()
                return
            if not self._answer_now(conn, msg):
                request = asyncio.create_task(self._answer(conn, msg))
                pending.add(request)
                request.add_done_callback(pending.discard)
                reads = reading.get(op)
                if reads is not None:
                    reads.add(request)
                    request.add_done_callback(reads.discard)
            if conn.backlog() > _REPLY_BACKLOG_BYTES or _reading_full(reading):
                stopped.append("")
                conn.stop_serving()

        try:
            await server_handshake(conn, token=self.token, roles=("client",))
            while True:
                await conn.serve(on_request)
                if not stopped:
                    break  # the client closed the connection
                op = stopped.pop()
                if op:
                    await conn.close_with_error(
                        "unknown-op", f"unknown request {op!r}; known: {sorted(_OPS)}"
                    )
                    break
                # A client that asks and does not read: read its next request
                # once fewer of its replies are being read than it may have,
                # and it has taken those queued.
                while _reading_full(reading):
                    being_read = [t for reads in reading.values() for t in reads]
                    await asyncio.wait(being_read, return_when=asyncio.FIRST_COMPLETED)
                await conn.drain()
        except (ProtocolError, ConnectionClosed) as exc:
            logger.info("client connection closed: %s", exc)
        except asyncio.CancelledError:
            pass
        finally:
            for request in pending:
                request.cancel()
            # `close` cancels us, maybe while the client is already leaving and
            # we wait here; end normally all the same: Python 3.11's stream
            # server logs a connection task that ends cancelled as an error.
            with contextlib.suppress(asyncio.CancelledError):
                await conn.close()
            self._connections.discard(task)

    async def _answer(self, conn: Connection, msg: dict[str, Any]) -> None:
        _client.set(conn)
        try:
            await _room(conn)
            reply = await _OPS[msg["op"]](self, msg)
        except ConnectionClosed:
            return
        except Exception as exc:
            reply = _error_reply(msg, exc)
        await _reply_with_room(conn, msg, reply)

    def _reply_soon(
        self, conn: Connection, msg: dict[str, Any], reply: dict[str, Any]
    ) -> None:
        """`_reply` now if the client has room, else once it has (a task)."""
        if conn.backlog() <= _REPLY_BACKLOG_BYTES or conn.closed:
            _reply(conn, msg, reply)
        else:
            self._keep(_reply_with_room(conn, msg, reply))

    def _keep(self, answer: Any) -> None:
        """Run the coroutine `answer` as a task, kept until it ends."""
        task = asyncio.ensure_future(answer)
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    # The two requests clients send by the thousand, submitting with no run id
    # and waiting for a live run, are answered without a task of their own:
    # their futures' callbacks reply. A task per request was a tenth of the
    # supervisor's work when many runs were submitted at once. Anything else,
    # or anything unusual about these two, goes the general way (`_answer`).

    def _answer_now(self, conn: Connection, msg: dict[str, Any]) -> bool:
        """Answer `msg` by callbacks if it is a common case; False if not."""
        op = msg["op"]
        if op == "wait":
            run_id = msg.get("run_id")
            waiter = self.supervisor.waiter(run_id) if isinstance(run_id, str) else None
            if waiter is None:
                return False
            waiter.add_done_callback(lambda done: self._answer_wait(conn, msg, done))
            return True
        if op != "submit" or msg.get("run_id") is not None:
            return False
        try:
            workflow, args = _submission(msg)
            run_id = self._new_ids.next()
            durable = self.supervisor.submit_fresh(workflow, args, run_id)
        except Exception as exc:
            _reply(conn, msg, _error_reply(msg, exc))
            return True
        durable.add_done_callback(
            lambda done: self._answer_submit(conn, msg, run_id, done)
        )
        return True

    def _answer_wait(
        self,
        conn: Connection,
        msg: dict[str, Any],
        done: asyncio.Future[RunSummary],
        extra: dict[str, Any] | None = None,
    ) -> None:
        if done.cancelled():
            return  # the supervisor is stopping: no answer, as for a task
        try:
            reply = {"op": "run", **summary_dict(done.result()), **(extra or {})}
        except Exception as exc:
            reply = _error_reply(msg, exc)
        self._reply_soon(conn, msg, reply)

    def _answer_submit(
        self, conn: Connection, msg: dict[str, Any], run_id: str, done: Any
    ) -> None:
        if done.cancelled():
            return
        try:
            self.supervisor.settle_submission(run_id, done.result())
        except Exception as exc:
            _reply(conn, msg, _error_reply(msg, exc))
            return
        if not msg.get("wait"):
            _reply(conn, msg, {"op": "submitted", "run_id": run_id, "created": True})
            return
        waiter = self.supervisor.waiter(run_id)
        if waiter is None:
            # Finished already and out of memory: the journal has the summary.
            waiting = {"op": "wait", "run_id": run_id, **_id_of(msg)}
            self._spawn_answer(conn, waiting, created=True)
            return
        waiter.add_done_callback(
            lambda finished: self._answer_wait(conn, msg, finished, {"created": True})
        )

    def _spawn_answer(
        self, conn: Connection, msg: dict[str, Any], created: bool
    ) -> None:
        async def answer() -> None:
            _client.set(conn)
            try:
                reply = {**await self._wait(msg), "created": created}
            except Exception as exc:
                reply = _error_reply(msg, exc)
            await _reply_with_room(conn, msg, reply)

        self._keep(answer())

    # Requests.

    async def _submit(self, msg: dict[str, Any]) -> dict[str, Any]:
        workflow, args = _submission(msg)
        chosen = msg.get("run_id")
        if chosen == "":
            raise BadRequest("bad-request", "an empty run id: give one, or none")
        # Only a missing id (or null) asks for a new one: an id of 0 or false
        # is a mistake, not "none", and a client retrying with it must not get
        # a new run each time.
        run_id = self._new_ids.next() if chosen is None else chosen
        if not isinstance(run_id, str) or not RUN_ID.match(run_id):
            raise BadRequest(
                "bad-request",
                f"run id {run_id!r} is not valid: a string of 1-128 letters, "
                "digits and _.:@-",
            )
        run_id, created = await self.supervisor.submit(
            workflow, args, run_id, fresh=chosen is None
        )
        if msg.get("wait"):
            # Submit and wait in one round trip: what `Client.run` asks for.
            reply = await self._wait({"op": "wait", "run_id": run_id})
            return {**reply, "created": created}
        return {"op": "submitted", "run_id": run_id, "created": created}

    async def _summary(self, run_id: str) -> dict[str, Any]:
        journal = self.supervisor.journal
        summary = await journal.run(run_id, result_limit=_SMALL_RESULT_CHARS)
        if summary is not None and summary.result is RESULT_LEFT_OUT:
            conn = _client.get(None)
            async with self._large_reads:
                if conn is not None:
                    await _room(conn)
                summary = await journal.run(run_id)
        if summary is None:
            raise RunNotFound(f"no run {run_id!r} in the journal")
        return {"op": "run", **summary_dict(summary)}

    async def _resolve(self, msg: dict[str, Any]) -> str:
        run_id = msg.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise BadRequest("bad-request", f"{msg['op']} needs a string 'run_id'")
        if run_id in self.supervisor.runs:
            return run_id
        return await self.supervisor.journal.resolve(run_id)

    async def _wait(self, msg: dict[str, Any]) -> dict[str, Any]:
        run_id = await self._resolve(msg)
        waiter = self.supervisor.waiter(run_id)
        if waiter is None:
            return await self._summary(run_id)
        summary = await waiter
        return {"op": "run", **summary_dict(summary)}

    async def _status(self, msg: dict[str, Any]) -> dict[str, Any]:
        return await self._summary(await self._resolve(msg))

    async def _cancel(self, msg: dict[str, Any]) -> dict[str, Any]:
        run_id = await self._resolve(msg)
        changed = await self.supervisor.cancel(
            run_id, str(msg.get("reason") or "cancelled")
        )
        return await self._done(run_id, changed)

    async def _reopen(self, msg: dict[str, Any]) -> dict[str, Any]:
        run_id = await self._resolve(msg)
        changed = await self.supervisor.reopen(
            run_id, str(msg.get("reason") or msg["op"])
        )
        return await self._done(run_id, changed)

    async def _done(self, run_id: str, changed: bool) -> dict[str, Any]:
        live = self.supervisor.runs.get(run_id)
        summary = await self.supervisor.journal.run(run_id) if live is None else None
        status = live.state.status.value if live else summary and summary.status
        return {"op": "done", "run_id": run_id, "changed": changed, "status": status}

    async def _list(self, msg: dict[str, Any]) -> dict[str, Any]:
        limit = msg.get("limit") or 100
        if type(limit) is not int or limit < 1:
            raise BadRequest(
                "bad-request", f"list's 'limit' must be a positive integer: {limit!r}"
            )
        for field in ("status", "workflow"):
            if not isinstance(msg.get(field), str | None):
                raise BadRequest(
                    "bad-request", f"list's {field!r} must be a string or null"
                )
        # A listing leaves large results out (a hundred runs of 15 MB would
        # not fit a frame, nor the supervisor's memory): `result_left_out`
        # says so, and a status of the run has it.
        runs = await self.supervisor.journal.runs(
            status=msg.get("status"),
            workflow=msg.get("workflow"),
            limit=limit,
            result_limit=_SMALL_RESULT_CHARS,
        )
        return {"op": "runs", "runs": [summary_dict(r) for r in runs]}

    async def _history(self, msg: dict[str, Any]) -> dict[str, Any]:
        run_id = await self._resolve(msg)
        events = await self.supervisor.journal.history(run_id)
        return {
            "op": "history",
            "run_id": run_id,
            "events": [codec.encode_dict(e) for e in events],
        }

    async def _stats(self, msg: dict[str, Any]) -> dict[str, Any]:
        stats = attrs.asdict(self.supervisor.stats)
        stats["live_runs"] = len(self.supervisor.runs)
        stats["workers"] = len(self.supervisor.pool.workers)
        return {"op": "stats", **stats}


def _submission(msg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The workflow and arguments of a submit request, checked."""
    workflow = msg.get("workflow")
    if not isinstance(workflow, str):
        raise BadRequest("bad-request", "submit needs a string 'workflow'")
    args = msg.get("args")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        raise BadRequest(
            "bad-request",
            f"submit's 'args' must be a JSON object, not {type(args).__name__}",
        )
    # A frame's payload was parsed as JSON, so `args` holds only JSON types;
    # what the journal cannot store (too deep, integers past 64 bits) and the
    # size limit are left to check.
    where = f"args of workflow {workflow}"
    check_json(args, where)
    check_size(orjson.dumps(args), where)
    return workflow, args


def _error_reply(msg: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """The error reply to a request that raised `exc`."""
    if isinstance(exc, BadRequest):
        code = exc.code
    elif isinstance(exc, (RunNotFound, UnknownNameError)):
        code = "not-found"
    elif isinstance(exc, RunIdConflict):
        code = "conflict"
    elif isinstance(exc, CodaError):
        code = "failed"
    else:
        logger.error("request %r failed", msg.get("op"), exc_info=exc)
        return {
            "op": "error",
            "code": "internal",
            "message": f"the supervisor failed on this request: {exc!r}; "
            "this is a bug, please report it",
        }
    return {"op": "error", "code": code, "message": str(exc)}


def _id_of(msg: dict[str, Any]) -> dict[str, Any]:
    return {"id": msg["id"]} if "id" in msg else {}


def _reply(conn: Connection, msg: dict[str, Any], reply: dict[str, Any]) -> None:
    """Send the reply to `msg` (with its id), unless the client has gone.

    A reply too large for the client's frame limit (a run's result near the
    value limit, in a summary with its error) becomes an error reply saying so:
    the client must hear something, and the connection stays usable.
    """
    faults.crash_point("supervisor.before_ack")
    reply.update(_id_of(msg))
    if not conn.closed:
        try:
            conn.send(reply)
        except (ValueTooLarge, ValueNotJSON) as exc:
            logger.warning("reply to %r not sent: %s", msg.get("op"), exc)
            error = {"op": "error", "code": "failed", "message": f"the reply {exc}"}
            conn.send({**error, **_id_of(msg)})
    faults.crash_point("supervisor.after_ack")


_OPS = {
    "submit": ClientServer._submit,
    "wait": ClientServer._wait,
    "status": ClientServer._status,
    "cancel": ClientServer._cancel,
    "retry": ClientServer._reopen,
    "resume": ClientServer._reopen,
    "list": ClientServer._list,
    "history": ClientServer._history,
    "stats": ClientServer._stats,
}


# The client whose request an `_answer` task is answering.
_client: contextvars.ContextVar[Connection] = contextvars.ContextVar("coda_client")


async def _room(conn: Connection) -> None:
    """Return once the client's unread replies are under the backlog limit."""
    while conn.backlog() > _REPLY_BACKLOG_BYTES:
        await conn.drain()


async def _reply_with_room(
    conn: Connection, msg: dict[str, Any], reply: dict[str, Any]
) -> None:
    """`_reply` once the client has room; nothing if it has gone meanwhile."""
    with contextlib.suppress(ConnectionClosed):
        await _room(conn)
        _reply(conn, msg, reply)


def _reading_full(reading: dict[str, set[asyncio.Task[None]]]) -> bool:
    """Whether a client has as many replies of some kind being read as it may."""
    return any(len(reads) >= _READING[op] for op, reads in reading.items())


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
