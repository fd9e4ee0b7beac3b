"""The Sentry example end to end: `python -m examples.sentry_app.pipeline`.

The pipeline starts its own `coda run examples.sentry_app.app` with real
workers, submits one run per bundled event and prints a JSON summary. Code of
the example is run in subprocesses from the repository root: in this pytest
process the name `examples` belongs to the tests' own package.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import (
    PYTHON,
    REPO,
    base_env,
    fresh_directory,
    processes_mentioning,
    wait_for,
)

BUNDLED_EVENTS = 49
PIPELINE = [PYTHON, "-m", "examples.sentry_app.pipeline"]


def run_pipeline(workdir: Path) -> dict[str, Any]:
    paths = ["--journal", str(workdir / "coda.db"), "--store", str(workdir / "s.db")]
    done = subprocess.run(
        [*PIPELINE, "--json", "--workers", "2", *paths],
        cwd=REPO,
        env=base_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    # The pipeline stops the supervisor it started; nothing may be left running.
    wait_for(
        lambda: not processes_mentioning(str(workdir)),
        10,
        "the pipeline's supervisor to exit",
    )
    return summary


def python_in_repo(code: str, *args: str) -> Any:
    """Run `code` with the repository's `examples` importable; its stdout as JSON."""
    done = subprocess.run(
        [PYTHON, "-c", code, *args],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


STORE_SUMMARY = """
import json, sys
from examples.sentry_app import store
print(json.dumps(store.summary(sys.argv[1])))
"""

REPLAY = """
import json, sys
from coda.replay import load_history, replay
from examples.sentry_app.app import process_event
events = load_history(sys.argv[1])
outcome = replay(process_event, events)
print(json.dumps({
    "events": len(events),
    "types": [type(e).__name__ for e in events],
    "run_id": outcome.run_id,
    "status": outcome.status,
    "result": outcome.result,
    "commands": len(outcome.commands),
}))
"""


@pytest.fixture(scope="module")
def processed() -> Iterator[tuple[Path, dict[str, Any]]]:
    """A directory where the pipeline has run once, and its summary."""
    with fresh_directory() as workdir:
        yield workdir, run_pipeline(workdir)


def test_pipeline_processes_the_bundled_events_once(
    processed: tuple[Path, dict[str, Any]],
) -> None:
    workdir, first = processed

    assert first["events"] == BUNDLED_EVENTS
    assert first["runs_completed"] == BUNDLED_EVENTS
    assert first["runs_failed"] == 0
    assert first["failed_runs"] == []
    assert first["symbolicated"] == 4
    # normalize + store for every event, symbolicate for the 4 that need it.
    assert first["tasks_executed"] == 2 * BUNDLED_EVENTS + 4
    stored = python_in_repo(STORE_SUMMARY, str(workdir / "s.db"))
    assert stored["events"] == BUNDLED_EVENTS
    assert first["stored_events"] == BUNDLED_EVENTS
    assert first["groups"] == stored["groups"]
    assert 0 < stored["groups"] < BUNDLED_EVENTS
    assert stored["times_seen"] == BUNDLED_EVENTS

    # Again on the same journal: the same run ids, found finished.
    second = run_pipeline(workdir)

    assert second["runs_completed"] == BUNDLED_EVENTS
    assert second["runs_failed"] == 0
    assert second["tasks_executed"] == 0
    assert python_in_repo(STORE_SUMMARY, str(workdir / "s.db")) == stored
    assert second["groups"] == first["groups"]


def test_history_json_of_a_pipeline_run_replays(
    processed: tuple[Path, dict[str, Any]],
) -> None:
    workdir, _ = processed
    coda = [PYTHON, "-m", "coda"]
    journal = ["--journal", str(workdir / "coda.db")]
    listed = subprocess.run(
        [*coda, "ls", "--json", "--limit", "1000", *journal],
        env=base_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    runs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(runs) == BUNDLED_EVENTS
    assert {r["status"] for r in runs} == {"completed"}
    # A symbolicated one: the longest history, with all three tasks.
    run = max(runs, key=lambda r: (r["result"]["symbolicated"], r["run_id"]))
    assert run["result"]["symbolicated"] is True

    dumped = subprocess.run(
        [*coda, "history", run["run_id"][:12], "--json", *journal],
        env=base_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    lines = dumped.stdout.splitlines()
    assert all(json.loads(line)["run_id"] == run["run_id"] for line in lines)
    path = workdir / "history.jsonl"
    path.write_text(dumped.stdout)

    outcome = python_in_repo(REPLAY, str(path))

    assert outcome["events"] == len(lines) == run["events"]
    assert outcome["run_id"] == run["run_id"]
    assert outcome["status"] == "completed"
    assert outcome["result"] == run["result"]
    assert outcome["commands"] == 0
    assert outcome["types"].count("TaskCompleted") == 3
    assert outcome["types"][-1] == "RunCompleted"
