"""The `coda` command line against a running supervisor: output and exit codes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from coda.journal.events import (
    RunCancelled,
    RunRetried,
    TaskCompleted,
    TaskReused,
    TaskStarted,
)

from .support import PYTHON, CodaProcess, base_env, wait_for


@pytest.fixture
def coda(shared_coda: CodaProcess) -> CodaProcess:
    """One supervisor for the module: each test uses runs and files of its own."""
    return shared_coda


def as_json(args: dict[str, object]) -> str:
    return json.dumps(args)


def test_submit_wait_prints_the_result(coda: CodaProcess) -> None:
    side = coda.workdir / "side-chain"
    args = {"side_file": str(side), "tag": "cli", "steps": 3, "delay": 0}

    done = coda.cli("submit", "chain", as_json(args), "--wait", "--json")

    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "completed"
    assert summary["result"] == {"tag": "cli", "results": [0, 1, 4]}

    human = coda.cli("submit", "quick", '{"x": 20}', "--wait")
    assert human.returncode == 0, human.stderr
    assert "completed" in human.stdout
    assert "41" in human.stdout.splitlines()[-1]


def test_failing_workflow_exits_1(coda: CodaProcess) -> None:
    workers = coda.worker_pids()

    done = coda.cli("submit", "doomed", '{"message": "kaboom"}', "--wait", "--json")

    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "failed"
    assert "kaboom" in summary["error"]["message"]

    waited = coda.cli("wait", summary["run_id"])
    assert waited.returncode == 1
    assert "kaboom" in waited.stdout
    # A task failing is the task's business: its worker carries on.
    assert sorted(coda.worker_pids()) == sorted(workers)
    assert "Traceback" not in coda.log_text()


def test_reading_an_unknown_run_exits_3(coda: CodaProcess) -> None:
    # The last one looks like rich markup; the message must still quote it.
    for run_id, json_flag in (("no-such-run", []), ("[/no-such-run]", ["--json"])):
        done = coda.cli("history", run_id, *json_flag)
        assert done.returncode == 3, (run_id, done.stdout, done.stderr)
        assert f"'{run_id}'" in done.stderr
        assert done.stdout == ""
    done = coda.cli("cancel", "no-such-run")
    assert done.returncode == 3, done.stderr
    done = coda.cli("submit", "no-such-workflow", "{}")
    assert done.returncode == 3, done.stderr
    assert "no-such-workflow" in done.stderr
    # Bad usage is 2, and is found before anything is sent.
    assert coda.cli("submit", "quick", "{not json").returncode == 2


def test_submit_without_a_supervisor_exits_4_naming_the_socket(
    workdir: Path,
) -> None:
    # A journal deep in a project tree, as real ones are: the socket path makes
    # the message longer than a terminal line.
    project = workdir / "home-of-the-team" / "services" / "ingest-pipeline-prod"
    project.mkdir(parents=True)
    journal = project / "coda.db"
    socket = project / ".coda" / "coda.db.sock"
    assert len(str(socket)) > 80

    env = base_env()
    env.pop("COLUMNS")  # a script's pipe: rich would assume 80 columns
    for cwd, extra in ((project, []), (workdir, ["--journal", str(journal)])):
        done = subprocess.run(
            [PYTHON, "-m", "coda", "submit", "quick", '{"x": 1}', *extra],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 4, done.stderr
        assert str(socket) in done.stderr, done.stderr
        assert done.stdout == ""


def test_cancel_a_running_run(coda: CodaProcess) -> None:
    marker = coda.workdir / "marker"
    args = {"marker": str(marker), "seconds": 30}
    submitted = coda.cli(
        "submit", "interruptible", as_json(args), "--run-id", "cancel-me-7f3a"
    )
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.strip() == "cancel-me-7f3a"
    wait_for(marker.exists, 10, "the task to start")

    # By a unique prefix of its id.
    done = coda.cli("cancel", "cancel-me", "--reason", "changed my mind")

    assert done.returncode == 0, done.stderr
    assert "cancel-me-7f3a" in done.stdout
    waited = coda.cli("wait", "cancel-me-7f3a", "--json")
    assert waited.returncode == 1
    assert json.loads(waited.stdout)["status"] == "cancelled"
    history = coda.history("cancel-me-7f3a")
    assert isinstance(history[-1], RunCancelled)
    assert history[-1].reason == "changed my mind"
    assert not any(isinstance(e, TaskCompleted) for e in history)

    # Cancelled already: nothing to change.
    again = coda.cli("cancel", "cancel-me-7f3a")
    assert again.returncode == 1
    assert "is cancelled and cannot be cancelled" in again.stderr
    listed = coda.cli("ls", "--json", "--status", "cancelled")
    assert [json.loads(line)["run_id"] for line in listed.stdout.splitlines()] == [
        "cancel-me-7f3a"
    ]


def test_retry_a_failed_run_reuses_cached_tasks(coda: CodaProcess) -> None:
    side = coda.workdir / "side-flaky"
    flag = coda.workdir / "flag"
    args = {"side_file": str(side), "tag": "flaky", "flag": str(flag)}

    failed = coda.cli("submit", "flaky", as_json(args), "--wait", "--json")

    assert failed.returncode == 1, failed.stderr
    summary = json.loads(failed.stdout)
    run_id = summary["run_id"]
    assert summary["status"] == "failed"
    assert "is not set" in summary["error"]["message"]

    flag.touch()
    retried = coda.cli("retry", run_id[:10], "--reason", "flag set")
    assert retried.returncode == 0, retried.stderr
    waited = coda.cli("wait", run_id, "--json")

    assert waited.returncode == 0, waited.stderr
    summary = json.loads(waited.stdout)
    assert summary["status"] == "completed"
    assert summary["attempt"] == 2
    assert summary["result"] == {"prepare": "prepared flaky", "check": "flag set"}

    history = coda.history(run_id)
    retry = [e for e in history if isinstance(e, RunRetried)]
    assert [e.reason for e in retry] == ["flag set"]
    reused = [e for e in history if isinstance(e, TaskReused)]
    assert [(e.attempt, e.task, e.from_attempt, e.result) for e in reused] == [
        (2, "prepare", 1, "prepared flaky")
    ]
    started = [(e.attempt, e.step) for e in history if isinstance(e, TaskStarted)]
    assert started == [(1, 0), (1, 1), (2, 1)]
    # The cached task ran once; the one without a cache key, once per attempt.
    assert side.read_text().splitlines() == [
        "flaky prepare",
        "flaky check",
        "flaky check",
    ]

    # The retried run's history prints, and replays locally without divergence.
    printed = coda.cli("history", run_id)
    assert printed.returncode == 0, printed.stderr
    assert "TaskReused" in printed.stdout
    replayed = coda.cli("replay", run_id, "--app", "e2e_app")
    assert replayed.returncode == 0, replayed.stderr
    assert "without divergence" in replayed.stdout

    # Completed now: nothing to retry.
    assert coda.cli("retry", run_id).returncode == 1


def test_values_are_printed_as_they_are(coda: CodaProcess) -> None:
    """Results and arguments are data, not markup for the terminal."""
    value = {"text": "[/x] [bold]not bold[/bold] [red]"}

    done = coda.cli(
        "submit", "echo", as_json({"value": value}), "--wait", "--run-id", "echo-markup"
    )

    assert done.returncode == 0, done.stderr
    assert json.dumps(value, separators=(",", ":")) in done.stdout
    shown = coda.cli("history", "echo-markup")
    assert shown.returncode == 0, shown.stderr
    assert "[/x] [bold]not bold[/bold]" in shown.stdout


def test_control_characters_in_an_error_do_not_reach_the_terminal(
    coda: CodaProcess,
) -> None:
    # An error message built from outside input: an escape sequence in it
    # (set the window title, clear the screen) is shown, not obeyed.
    message = "bad \x1b]0;PWNED\x07 title \x1b[2J clear \r over"
    done = coda.cli(
        "submit", "doomed", as_json({"message": message}), "--wait", "--run-id", "esc"
    )
    assert done.returncode == 1
    shown = coda.cli("history", "esc")
    for output in (done.stdout + done.stderr, shown.stdout):
        assert "\x1b" not in output and "\x07" not in output and "\r" not in output
    assert "bad \\x1b]0;PWNED\\x07 title" in done.stdout
    assert "\\x1b[2J" in shown.stdout


def test_cancelling_a_run_stops_its_running_async_task(coda: CodaProcess) -> None:
    started = coda.workdir / "started"
    finished = coda.workdir / "finished"
    args = {"started": str(started), "finished": str(finished), "seconds": 1.5}
    submitted = coda.cli("submit", "cancellable", as_json(args), "--run-id", "stop-me")
    assert submitted.returncode == 0, submitted.stderr
    wait_for(started.exists, 10, "the task to start")

    assert coda.cli("cancel", "stop-me").returncode == 0

    # Had the try gone on, it would have written its marker 1.5 s after it
    # started; give it twice that.
    time.sleep(3.0)
    assert not finished.exists()
    history = coda.history("stop-me")
    assert isinstance(history[-1], RunCancelled)


def _coda_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run in `workdir`, with no supervisor started for it."""
    return subprocess.run(
        [PYTHON, "-m", "coda", *args],
        cwd=workdir,
        env=base_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_bad_options_are_usage_errors_not_tracebacks(workdir: Path) -> None:
    for args in (
        ("run", "e2e_app", "--synchronous", "sometimes"),
        ("run", "e2e_app", "--tcp", "127.0.0.1:notaport"),
        ("run", "e2e_app", "--workers", "0"),
        ("run", "e2e_app", "--heartbeat-timeout", "0"),
        ("ls", "--status", "bogus"),
        ("ls", "--limit", "-5"),
        ("run", "e2e_app", "--heartbeat-interval", "5", "--heartbeat-timeout", "1"),
        ("run", "e2e_app", "--task-timeout=-3"),
        ("run", "e2e_app", "--task-timeout=nan"),
        ("submit", "quick", '{"x": NaN}'),
    ):
        done = _coda_cli(workdir, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, args
    # Nothing was created by the refused `coda run`s.
    assert not (workdir / "coda.db").exists()


def test_an_app_that_raises_on_import_shows_its_own_traceback(workdir: Path) -> None:
    """`coda run` on an app with a bug in its import: the app's frames and its
    exception, without the frames of Coda and importlib around them."""
    (workdir / "raising_app.py").write_text(
        "import coda\nimport raising_helper\n", encoding="utf-8"
    )
    (workdir / "raising_helper.py").write_text(
        "def load():\n    raise KeyError('SENTRY_DSN')\n\nload()\n", encoding="utf-8"
    )
    done = _coda_cli(workdir, "run", "raising_app")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert "app module 'raising_app' raised an exception" in lines[0]
    assert lines[1] == "Traceback (most recent call last):"
    assert 'raising_app.py", line 2, in <module>' in lines[2]
    assert 'raising_helper.py", line 2, in load' in done.stderr
    assert lines[-1] == "KeyError: 'SENTRY_DSN'"
    assert "importlib" not in done.stderr
    assert "coda/runtime" not in done.stderr and "coda/cli.py" not in done.stderr


def test_history_shows_a_retry_time_past_year_9999(workdir: Path) -> None:
    """A retry policy's backoff may put a retry past what a calendar date can
    hold; `coda history` shows the number instead of failing."""
    from coda.journal.events import (
        AttemptStarted,
        ErrorInfo,
        RunSubmitted,
        TaskFailed,
        TaskScheduled,
        TaskStarted,
    )
    from coda.journal.sqlite import SQLiteJournal

    run = "far-retry"
    step = {"run_id": run, "at": 100.0, "attempt": 1, "step": 0}
    events = [
        RunSubmitted(run_id=run, seq=0, at=100.0, workflow="w", args={}),
        AttemptStarted(run_id=run, seq=1, at=100.0, attempt=1),
        TaskScheduled(seq=2, task="t", args={}, **step),
        TaskStarted(seq=3, try_number=1, **step),
        TaskFailed(
            seq=4,
            try_number=1,
            error=ErrorInfo(type="ValueError", message="no"),
            retry_at=1e13,
            **step,
        ),
    ]

    async def write() -> None:
        async with await SQLiteJournal.open(workdir / "coda.db") as journal:
            await journal.append(events)

    asyncio.run(write())
    done = _coda_cli(workdir, "history", run)
    assert done.returncode == 0, done.stderr
    assert "retry_at=10000000000000.000 (seconds since 1970)" in done.stdout


def test_coda_run_serves_and_stops_cleanly_with_nobody_reading_stderr(
    workdir: Path,
) -> None:
    """The serving and stopping lines are for a person; a stderr pipe that
    nobody reads any more must not end the supervisor or change its exit."""
    process = subprocess.Popen(
        [PYTHON, "-m", "coda", "run", "e2e_app", "--workers", "1"],
        cwd=workdir,
        env=base_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline().decode()
        assert first.startswith("coda: supervisor pid"), first
        process.stderr.close()
        time.sleep(0.5)
        assert process.poll() is None, "the supervisor ended"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        # What the app's exception was raised from says what is wrong.
        (
            "import json\ntry:\n    json.loads('{,}')\nexcept ValueError as e:\n"
            "    raise RuntimeError('no settings') from e\n",
            ["JSONDecodeError: Expecting property name", "RuntimeError: no settings"],
        ),
        (
            "raise ExceptionGroup('two', [ValueError('first'), KeyError('second')])\n",
            ["ValueError: first", "KeyError: 'second'"],
        ),
        # An app that exits while imported cannot be served: not a quiet exit 0.
        ("import sys\nsys.exit(0)\n", ["SystemExit: 0"]),
        # A missing module whose name begins the app's is the app's import.
        ("import settings\n", ["ModuleNotFoundError: No module named 'settings'"]),
    ],
)
def test_what_an_app_raises_on_import_is_shown_whole(
    workdir: Path, source: str, shown: list[str]
) -> None:
    (workdir / "settings_app.py").write_text(source, encoding="utf-8")
    done = _coda_cli(workdir, "run", "settings_app")
    assert done.returncode == 1, done.stderr
    assert "app module 'settings_app' raised an exception" in done.stderr
    for text in shown:
        assert text in done.stderr, done.stderr
    assert "importlib" not in done.stderr


def test_coda_run_says_why_it_cannot_make_its_lock_file(workdir: Path) -> None:
    # A file where the lock's folder goes: mkdir fails as on a read-only
    # mount, which a test cannot make without privileges.
    (workdir / ".coda").write_text("in the way", encoding="utf-8")
    done = _coda_cli(workdir, "run", "e2e_app")
    assert done.returncode == 1, done.stderr
    assert "cannot make the lock file" in done.stderr
    assert ".coda/coda.db.lock" in done.stderr
    assert "Traceback" not in done.stderr
