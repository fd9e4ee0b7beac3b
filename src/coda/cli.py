"""The `coda` command line.

Reading commands (`history`, `ls`, `replay`, `doctor`) open the journal file
read-only and work whether or not a supervisor is running; they never lock it.
Commands that change something (`submit`, `cancel`, `retry`, `resume`) ask the
supervisor, the journal's only writer.

Exit codes, for scripts: 0 success; 1 a run failed, was cancelled or is parked,
`doctor` found problems, or `coda run` stopped on an error; 2 bad usage; 3 no
such run or workflow; 4 no supervisor reachable; 5 replay diverged from the
history.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coda.errors import (
    CodaError,
    NondeterminismError,
    ProtocolError,
    RunCancelled,
    RunFailedError,
    RunNotFound,
    RunParkedError,
    UnknownNameError,
)
from coda.journal import codec
from coda.journal.events import Event
from coda.protocol import HandshakeRefused
from coda.runtime.client import DEFAULT_JOURNAL, RequestError
from coda.state import RunStatus

__all__ = ["app", "main"]

EXIT_RUN_FAILED = 1
EXIT_NOT_FOUND = 3
EXIT_NO_SUPERVISOR = 4
EXIT_DIVERGED = 5

app = typer.Typer(
    help="Coda: durable workflows on one SQLite file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output is for programs and logs: don't squeeze tables into 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False)

JournalOpt = Annotated[
    str,
    typer.Option(
        "--journal",
        "-j",
        envvar="CODA_JOURNAL",
        help="The journal file (SQLite).",
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        envvar="CODA_ADDRESS",
        help="Supervisor address: a Unix socket path or tcp://host:port "
        "(default: the socket beside the journal).",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="CODA_TOKEN", help="Shared token for TCP."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="One JSON object a line, for programs.")
]


class Durability(enum.StrEnum):
    FULL = "FULL"
    NORMAL = "NORMAL"
    OFF = "OFF"


def _print_json(value: Any) -> None:
    # Not through rich: a JSON line must never be wrapped or styled.
    sys.stdout.write(orjson.dumps(value).decode() + "\n")


def _fail(message: str, code: int) -> NoReturn:
    # Never folded (scripts look for the paths and ids in it), and never read as
    # markup: messages quote what users typed and what their code raised.
    err.print(f"[red]error:[/red] {escape(_visible(message))}", soft_wrap=True)
    raise typer.Exit(code)


def _guard(call: Any) -> Any:
    """Run `call`, turning Coda's errors into a message and an exit code."""
    try:
        return call()
    except (RunNotFound, UnknownNameError) as exc:
        _fail(str(exc), EXIT_NOT_FOUND)
    except NondeterminismError as exc:
        _fail(str(exc), EXIT_DIVERGED)
    except (RunFailedError, RunCancelled, RunParkedError) as exc:
        _fail(str(exc), EXIT_RUN_FAILED)
    except RequestError as exc:
        _fail(str(exc), 2 if exc.code == "bad-request" else 1)
    except HandshakeRefused as exc:
        _fail(f"the supervisor refused this client: {exc}", 1)
    except ProtocolError as exc:
        # The supervisor went away mid-request: that is not a run failing.
        _fail(f"lost the supervisor: {exc}", EXIT_NO_SUPERVISOR)
    except CodaError as exc:
        code = EXIT_NO_SUPERVISOR if "cannot reach a supervisor" in str(exc) else 1
        _fail(str(exc), code)
    except FileNotFoundError as exc:
        _fail(f"no such file: {exc.filename}", EXIT_NOT_FOUND)


def _announce(line: str) -> None:
    """A lifecycle line of `coda run` (serving, stopping), on stderr.

    Never what decides whether the supervisor serves or how it exits: a
    stderr that is closed, full or a pipe nobody reads loses the line, as a
    log line would be lost (rich would end the process on a broken pipe).
    """
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(_visible(line) + "\n")
        sys.stderr.flush()


def _when(stamp: float | None) -> str:
    if stamp is None:
        return ""
    try:
        when = dt.datetime.fromtimestamp(stamp)
    except (OverflowError, OSError, ValueError):
        # Past year 9999 (a retry policy's backoff may put a retry there) or
        # not a time at all: the number is all there is to show.
        return f"{stamp:.3f} (seconds since 1970)"
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _short(value: Any, width: int = 60) -> str:
    """`value` for a person, cut to `width`; escaped, since rich reads markup."""
    text = orjson.dumps(value).decode() if not isinstance(value, str) else value
    return escape(_visible(text if len(text) <= width else text[: width - 1] + "…"))


# Control characters other than tab and newline, written as escapes: error
# messages and results often carry what came from outside (an event payload,
# a file's name), and an escape sequence in them would reach the terminal as
# a command (set its title, clear the screen, fake a line of output).
_CONTROLS = {
    code: f"\\x{code:02x}"
    for code in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))
}


def _visible(text: str) -> str:
    """`text` with its control characters (but tab and newline) escaped."""
    return text.translate(_CONTROLS)


def _journal_must_exist(journal: str) -> None:
    if not Path(journal).exists():
        _fail(
            f"no journal at {journal}; pass --journal or run from the directory "
            "where `coda run` was started",
            EXIT_NOT_FOUND,
        )


# Running.


@app.command()
def run(
    app_module: Annotated[
        str,
        typer.Argument(
            metavar="APP",
            help="Module defining workflows and tasks, e.g. examples.sentry_app.app",
        ),
    ],
    journal: JournalOpt = DEFAULT_JOURNAL,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", "-w", min=1, help="Worker processes (default: CPU count)."
        ),
    ] = None,
    socket_path: Annotated[
        str | None, typer.Option("--socket", help="Unix socket for clients.")
    ] = None,
    tcp: Annotated[
        str | None,
        typer.Option(
            "--tcp", help="Also listen on HOST:PORT (loopback unless --token)."
        ),
    ] = None,
    token: TokenOpt = None,
    synchronous: Annotated[
        Durability,
        typer.Option(
            "--synchronous",
            case_sensitive=False,
            help="SQLite durability: FULL (default, survives power loss), NORMAL "
            "(survives a crash of any process), OFF (throwaway journals).",
        ),
    ] = Durability.FULL,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            "-c",
            min=1,
            help="Tries one worker runs at once (async tasks on its loop, plain "
            "def tasks each on a thread of its own).",
        ),
    ] = 64,
    task_timeout: Annotated[
        float,
        typer.Option(
            "--task-timeout",
            help="Seconds a try of a task without its own timeout may run before "
            "its worker is replaced (0: no limit).",
        ),
    ] = 300.0,
    heartbeat_interval: Annotated[
        float,
        typer.Option(
            "--heartbeat-interval", min=0.05, help="Seconds between worker pings."
        ),
    ] = 1.0,
    heartbeat_timeout: Annotated[
        float,
        typer.Option(
            "--heartbeat-timeout",
            min=0.5,
            help="Seconds without an answer after which a worker is deemed hung "
            "and replaced (an async task blocking its event loop, say).",
        ),
    ] = 10.0,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, help="-v for lifecycle, -vv for detail."
        ),
    ] = 0,
) -> None:
    """Start a supervisor and its workers on JOURNAL; serve until Ctrl-C or SIGTERM.

    Unfinished runs found in the journal resume. Stopping is clean: nothing
    acknowledged is lost, and tasks cut short run again at the next start.
    """
    from coda.runtime.main import serve

    level = ("WARNING", "INFO", "DEBUG")[min(verbose, 2)]
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.path.insert(0, os.getcwd())
    address = None
    if tcp:
        host, _, port = tcp.rpartition(":")
        if not port.isdigit() or not 0 <= int(port) < 65536:
            _fail(f"--tcp {tcp!r}: give HOST:PORT, e.g. 127.0.0.1:7400", 2)
        address = (host or "127.0.0.1", int(port))
    if heartbeat_interval >= heartbeat_timeout:
        _fail(
            f"--heartbeat-interval ({heartbeat_interval}s) must be shorter than "
            f"--heartbeat-timeout ({heartbeat_timeout}s)",
            2,
        )
    if not task_timeout >= 0:  # NaN too
        _fail(f"--task-timeout must be 0 (no limit) or positive, not {task_timeout}", 2)
    _guard(
        lambda: asyncio.run(
            serve(
                app_module,
                journal_path=journal,
                workers=workers,
                socket_path=socket_path,
                tcp=address,
                token=token,
                synchronous=synchronous.value,
                log_level=level,
                announce=_announce,
                task_timeout=task_timeout or None,
                concurrency=concurrency,
                heartbeat_interval=heartbeat_interval,
                heartbeat_timeout=heartbeat_timeout,
            )
        )
    )


def _with_client(
    journal: str, address: str | None, token: str | None, work: Any
) -> Any:
    from coda.runtime.client import Client

    async def go() -> Any:
        client = await Client.connect(address, journal=journal, token=token)
        try:
            return await work(client)
        finally:
            await client.close()

    return _guard(lambda: asyncio.run(go()))


@app.command()
def submit(
    workflow: Annotated[str, typer.Argument(help="Workflow name.")],
    args: Annotated[str, typer.Argument(help="Arguments as a JSON object.")] = "{}",
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id", help="Idempotency: the same id twice is the same run."
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the run's result.")
    ] = False,
    journal: JournalOpt = DEFAULT_JOURNAL,
    address: AddressOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a run of WORKFLOW; print its run id (and its result with --wait)."""
    try:
        parsed = json.loads(args, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        _fail(f"ARGS is not JSON: {exc}", 2)
    if not isinstance(parsed, dict):
        _fail("ARGS must be a JSON object of keyword arguments", 2)

    async def work(client: Any) -> Any:
        new_id = await client.submit(workflow, parsed, run_id=run_id)
        return new_id, (await client.wait(new_id) if wait else None)

    new_id, summary = _with_client(journal, address, token, work)
    if summary is None:
        if as_json:
            _print_json({"run_id": new_id})
        else:
            out.print(new_id)
        return
    _print_summary(summary, as_json)
    if summary["status"] != "completed":
        raise typer.Exit(EXIT_RUN_FAILED)


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        # The run's summary, without the request's envelope.
        _print_json({k: v for k, v in summary.items() if k not in ("op", "id")})
        return
    out.print(f"run {summary['run_id']} {summary['status']}")
    if summary["status"] == "completed":
        out.print(_short(summary["result"], 2000))
    elif summary.get("error"):
        error = summary["error"]
        out.print(escape(_visible(f"{error['type']}: {error['message']}")))


@app.command()
def wait(
    run_ids: Annotated[
        list[str], typer.Argument(help="Run ids (unique prefixes work).")
    ],
    journal: JournalOpt = DEFAULT_JOURNAL,
    address: AddressOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Wait for runs to finish, showing progress; exit 1 if any did not complete."""
    from rich.progress import Progress

    async def work(client: Any) -> list[dict[str, Any]]:
        summaries = []
        with Progress(console=err, transient=True, disable=as_json) as progress:
            bar = progress.add_task("waiting", total=len(run_ids))
            waits = [client.wait(r) for r in run_ids]
            for done in asyncio.as_completed(waits):
                summaries.append(await done)
                progress.advance(bar)
        return summaries

    summaries = _with_client(journal, address, token, work)
    for summary in summaries:
        _print_summary(summary, as_json)
    if any(s["status"] != "completed" for s in summaries):
        raise typer.Exit(EXIT_RUN_FAILED)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (JSON has no NaN or infinity)")


_PAST = {"cancel": "cancelled", "retry": "retried", "resume": "resumed"}


def _change(
    op: str,
    run_id: str,
    reason: str,
    journal: str,
    address: str | None,
    token: str | None,
) -> None:
    changed = _with_client(
        journal, address, token, lambda c: c.request(op, run_id=run_id, reason=reason)
    )
    if not changed["changed"]:
        _fail(
            f"run {changed['run_id']} is {changed.get('status', 'not in a status')} "
            f"and cannot be {_PAST[op]}",
            1,
        )
    out.print(f"run {changed['run_id']}: {op} recorded")


@app.command()
def cancel(
    run_id: str,
    reason: Annotated[
        str, typer.Option(help="Why; kept in the history.")
    ] = "cancelled from the CLI",
    journal: JournalOpt = DEFAULT_JOURNAL,
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Cancel an unfinished run."""
    _change("cancel", run_id, reason, journal, address, token)


@app.command()
def retry(
    run_id: str,
    reason: Annotated[
        str, typer.Option(help="Why; kept in the history.")
    ] = "retried from the CLI",
    journal: JournalOpt = DEFAULT_JOURNAL,
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Retry a failed or cancelled run: a new attempt, cached task results reused."""
    _change("retry", run_id, reason, journal, address, token)


@app.command()
def resume(
    run_id: str,
    reason: Annotated[
        str, typer.Option(help="Why; kept in the history.")
    ] = "resumed from the CLI",
    journal: JournalOpt = DEFAULT_JOURNAL,
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Resume a parked run once code that matches its history is deployed."""
    _change("resume", run_id, reason, journal, address, token)


# Reading.


@app.command("ls")
def list_runs(
    status: Annotated[
        RunStatus | None,
        typer.Option(help="Only runs in this status."),
    ] = None,
    workflow: Annotated[
        str | None, typer.Option(help="Only runs of this workflow.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, help="At most this many, newest first.")
    ] = 50,
    journal: JournalOpt = DEFAULT_JOURNAL,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    from coda.journal.sqlite import read_runs_sync

    _journal_must_exist(journal)
    runs = _guard(
        lambda: read_runs_sync(
            journal,
            status=status.value if status else None,
            workflow=workflow,
            limit=limit,
            # The table shows no result: read none (JSON lines print them).
            result_limit=None if as_json else 0,
        )
    )
    if as_json:
        from coda.runtime.server import summary_dict

        for summary in runs:
            _print_json(summary_dict(summary))
        return
    table = Table(
        "run", "workflow", "status", "attempt", "events", "submitted", "updated"
    )
    for s in runs:
        table.add_row(
            s.run_id,
            s.workflow,
            s.status,
            str(s.attempt),
            str(s.events),
            _when(s.submitted_at),
            _when(s.updated_at),
        )
    out.print(table)


def _event_detail(event: Event) -> str:
    body = codec.encode_dict(event)
    for key in ("v", "type", "run_id", "seq", "at", "attempt", "step"):
        body.pop(key, None)
    if "policy" in body:
        body.pop("policy")
    if isinstance(body.get("error"), dict):
        error = body.pop("error")
        body["error"] = f"{error['type']}: {error['message']}"
    if isinstance(body.get("retry_at"), float):
        body["retry_at"] = _when(body["retry_at"])
    return ", ".join(f"{k}={_short(v, 70)}" for k, v in body.items() if v is not None)


@app.command()
def history(
    run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix.")],
    journal: JournalOpt = DEFAULT_JOURNAL,
    as_json: JsonOpt = False,
) -> None:
    """Print a run's events; --json prints what `coda.replay.load_history` reads."""
    from coda.journal.sqlite import read_history_sync

    _journal_must_exist(journal)
    events = _guard(lambda: read_history_sync(journal, run_id))
    if as_json:
        for event in events:
            sys.stdout.write(codec.encode(event).decode() + "\n")
        return
    table = Table(
        "#", "at", "event", "attempt", "step", "detail", title=f"run {events[0].run_id}"
    )
    for e in events:
        table.add_row(
            str(e.seq),
            _when(e.at),
            type(e).__name__,
            str(getattr(e, "attempt", "")),
            str(getattr(e, "step", "")),
            _event_detail(e),
        )
    out.print(table)


@app.command()
def replay(
    run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix.")],
    app_module: Annotated[
        str, typer.Option("--app", help="Module defining the workflow.")
    ],
    journal: JournalOpt = DEFAULT_JOURNAL,
    history_file: Annotated[
        str | None,
        typer.Option(
            "--file", help="Read the history from `coda history --json` output instead."
        ),
    ] = None,
) -> None:
    """Replay a run against the current code, with no supervisor and no side effects."""
    from coda.definitions import load_app
    from coda.replay import load_history
    from coda.replay import replay as replay_run

    sys.path.insert(0, os.getcwd())

    def go() -> Any:
        source = history_file or journal
        if history_file is None:
            _journal_must_exist(journal)
        events = load_history(source, run_id)
        if not events:
            raise RunNotFound(f"no events of run {run_id!r} in {source}")
        registry = load_app(app_module)
        first = events[0]
        workflow = registry.workflow(getattr(first, "workflow", ""))
        return replay_run(workflow, events)

    outcome = _guard(go)
    out.print(
        f"run {outcome.run_id}: replayed {outcome.status} without divergence"
        + (f"; next: {len(outcome.commands)} new commands" if outcome.commands else "")
    )
    error, recorded = outcome.error, outcome.recorded_error
    if outcome.reproduced:
        if error is not None:
            out.print(
                escape(
                    _visible(
                        f"recorded error reproduced: {error.type}: {error.message}"
                    )
                )
            )
        return
    # The steps replay, but the code ends the run otherwise than recorded.
    if error is not None and recorded is not None:
        out.print(
            escape(_visible(f"the code now fails with {error.type}: {error.message}"))
        )
        out.print(
            escape(_visible(f"the history has {recorded.type}: {recorded.message}"))
        )
        _fail("the recorded error is not reproduced", 1)
    out.print(f"the code now returns {_short(outcome.result, 300)}")
    out.print(f"the history has {_short(outcome.recorded_result, 300)}")
    _fail("the recorded result is not reproduced", 1)


@app.command()
def doctor(
    journal: Annotated[
        str, typer.Argument(help="The journal file to check.")
    ] = DEFAULT_JOURNAL,
) -> None:
    """Check a journal: SQLite integrity, history gaps, projections against the fold.

    Reports each problem and changes nothing; exits 1 if it found any.
    """
    from coda.doctor import check_journal

    _journal_must_exist(journal)
    problems = _guard(lambda: asyncio.run(check_journal(journal)))
    for problem in problems:
        out.print(f"- {problem}")
    if problems:
        _fail(f"{len(problems)} problems found in {journal}", 1)
    out.print(f"{journal}: no problems found")


def main() -> None:
    app()
