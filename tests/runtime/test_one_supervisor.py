"""One supervisor per journal: a second `coda run` on it refuses to start."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from coda.journal.events import TaskFailed

from .support import PYTHON, CodaProcess, base_env, session_members, wait_for


def test_second_supervisor_on_the_same_journal_refuses(coda: CodaProcess) -> None:
    marker = coda.workdir / "marker"
    with coda.client() as client:
        run_id = client.submit(
            "interruptible", {"marker": str(marker), "seconds": 1.5}, run_id="busy"
        )
        wait_for(marker.exists, 10, "the task to start")

        code, output = second_supervisor(coda, coda.journal)

        # The first one goes on undisturbed, and is still the one clients reach.
        result = client.result(run_id, timeout=10)
        assert client.stats()["submitted"] == 1

    assert code == 1, output
    assert str(coda.journal) in output
    assert f"pid {coda.pid}" in output
    assert result["first_pid"] == result["pid"]
    history = coda.history(run_id)
    # The second supervisor did not "recover" the run the first was running.
    assert not [e for e in history if isinstance(e, TaskFailed)], history
    assert coda.socket.exists()


def second_supervisor(coda: CodaProcess, journal: Path) -> tuple[int, str]:
    """Start `coda run` on `journal` beside `coda`'s; its exit code and output."""
    command = [PYTHON, "-m", "coda", "run", coda.app, "--journal", str(journal)]
    second = subprocess.Popen(
        [*command, "--workers", "1"],
        cwd=coda.workdir,
        env=base_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = second.communicate(timeout=20)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert session_members(second.pid) == []
    return second.returncode, output


@pytest.mark.parametrize("alias", ["symlink", "hard link"])
def test_the_journal_under_another_name_is_refused_too(
    coda: CodaProcess, alias: str
) -> None:
    # In another directory, with a .coda of its own: only the file is shared.
    other = coda.workdir / "other"
    other.mkdir()
    journal = other / "alias.db"
    if alias == "symlink":
        journal.symlink_to(coda.journal)
    else:
        os.link(coda.journal, journal)
    with coda.client() as client:
        run_id = client.submit("quick", {"x": 1}, run_id="before")
        assert client.result(run_id, timeout=10) == 3

        code, output = second_supervisor(coda, journal)

        assert client.result(client.submit("quick", {"x": 2}), timeout=10) == 5
        assert client.stats()["submitted"] == 2
    assert code == 1, output
    assert f"another supervisor (pid {coda.pid}) is serving {coda.journal}" in output
    assert "Traceback" not in output
    assert coda.alive()
    if alias == "symlink":
        # The CLI given the link reaches the supervisor serving the file.
        status = coda.cli("wait", "before", "--journal", str(journal))
        assert status.returncode == 0, status.stderr
        assert "completed" in status.stdout
