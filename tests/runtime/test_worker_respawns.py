"""Workers that cannot start are started again ever later, with a log line
saying what to check, not in a hot loop."""

from __future__ import annotations

import re
import time
from pathlib import Path

from .support import CodaProcess, wait_for


class SupervisorWithoutWorkers(CodaProcess):
    """A `coda run` whose workers never come up: ready once it serves."""

    def wait_ready(self, timeout: float) -> None:
        wait_for(
            lambda: "serving" in self.log_text(), timeout, "the supervisor to serve"
        )


def test_workers_failing_to_import_the_app_are_started_again_ever_later(
    workdir: Path,
) -> None:
    supervisor = SupervisorWithoutWorkers(workdir, app="worker_import_fails", workers=1)
    imports = workdir / "worker-imports.log"
    try:
        supervisor.start()
        wait_for(imports.exists, 10, "a worker to try importing the app")
        first = time.monotonic()
        time.sleep(5.0)
        assert supervisor.alive()
        spawned = len(imports.read_text().splitlines())
        elapsed = time.monotonic() - first
    finally:
        problems = supervisor.cleanup()
    log = supervisor.log_text()
    print(log)
    assert not problems

    # The old code started one every 0.16 s or so: about 30 in 5 s. Now the
    # pauses between them are 0.2, 0.4, 0.8, 1.6, 3.2 s, ..., at most 5.
    assert 2 <= spawned <= 6, (spawned, elapsed)
    assert "exited with code 1 before its handshake" in log
    assert "Check that the app imports cleanly" in log
    # Each failed worker says what the app raised, with the app's frames only.
    assert log.count("app module 'worker_import_fails' raised an exception") == spawned
    assert "RuntimeError: this app cannot be imported in a worker" in log
    assert "importlib" not in log
    # Serving is said to the person at the terminal, not as a warning.
    assert "\ncoda: supervisor pid" in log or log.startswith("coda: supervisor pid")
    assert "WARNING coda.runtime.main" not in log
    # Said once a step, each step longer than the one before.
    pauses = [float(p) for p in re.findall(r"next one in ([\d.]+)s", log)]
    assert pauses and pauses == sorted(set(pauses)), pauses
