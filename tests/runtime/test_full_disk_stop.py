"""A supervisor whose disk filled up still stops on SIGTERM, and loses nothing.

`coda run` starts under a file-size limit (RLIMIT_FSIZE; Python ignores
SIGXFSZ, so writing past it fails like a full disk would), runs are
submitted until the journal refuses them, and then SIGTERM must end the
process: the final "interrupted tries" append fails too, and that failure
once left the journal's threads running and the process hanging after it had
let go of the journal's lock. Started again without the limit, every
acknowledged run completes and `coda doctor` finds nothing wrong.
"""

from __future__ import annotations

import signal
import sys
import time

from coda.runtime.client import SyncClient

from .support import PYTHON, CodaProcess, fresh_directory

LIMIT_BYTES = 1_500_000


class LimitedCoda(CodaProcess):
    def command(self) -> list[str]:
        limited = (
            "import os, resource, sys; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, "
            f"({LIMIT_BYTES}, {LIMIT_BYTES})); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        return [PYTHON, "-c", limited, *super().command()[1:]]


def test_sigterm_after_the_disk_filled_stops_and_loses_nothing() -> None:
    assert sys.platform != "win32"
    with fresh_directory() as workdir:
        limited = LimitedCoda(workdir, workers=2)
        side = str(workdir / "side.txt")
        acknowledged: dict[str, str] = {}
        try:
            limited.start()
            client = SyncClient(limited.socket)
            try:
                # Runs in full swing when the disk fills (the first twenty):
                # their state in memory runs ahead of what the journal took.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    n = len(acknowledged)
                    if n < 20:
                        run_id, workflow = f"chain-{n}", "chain"
                        args = {"side_file": side, "tag": run_id, "steps": 400}
                        args["delay"] = 0
                    else:
                        run_id, workflow, args = f"quick-{n}", "quick", {"x": 1}
                    try:
                        client.submit(workflow, args, run_id=run_id)
                    except Exception:
                        break
                    acknowledged[run_id] = workflow
                else:
                    raise AssertionError("the file-size limit was never reached")
            finally:
                client.close()

            # At once, while the runs the refused appends touched are still
            # ahead of the journal (they are reread a second later).
            started = time.monotonic()
            code = limited.stop(signal.SIGTERM, timeout=20)
            assert time.monotonic() - started < 20, limited.log_text()[-3000:]
            assert code == 0, limited.log_text()[-3000:]
        finally:
            problems = limited.cleanup()
        assert not problems, problems

        free = CodaProcess(workdir, workers=2)
        try:
            free.start()
            client = free.client()
            try:
                for run_id, workflow in acknowledged.items():
                    summary = client.wait(run_id)
                    assert summary["status"] == "completed", summary
                    if workflow == "quick":
                        assert summary["result"] == 3
                    else:
                        assert summary["result"]["results"][-1] == 399 * 399
            finally:
                client.close()
        finally:
            assert not free.cleanup()
        doctor = free.cli("doctor", str(free.journal))
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
