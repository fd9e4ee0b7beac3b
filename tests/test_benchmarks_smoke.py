"""The benchmark suite runs end to end in its quick form (no timing thresholds).

`python -m benchmarks --quick --only W2,W3 --no-peers --out TMP` must start a
real `coda run`, measure, and write a results JSON with both workloads and
positive figures. What the figures are is the benchmark's business, not a
test's: nothing here depends on how fast this machine is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "W2,W3",
            "--no-peers",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    data = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert set(data["workloads"]) == {"W2", "W3"}
    w2 = data["workloads"]["W2"]["systems"]["coda"]["summary"]
    w3 = data["workloads"]["W3"]["systems"]["coda"]["summary"]
    assert w2["runs_per_s"]["median"] > 0
    assert w3["p50_ms"]["median"] > 0
    assert w3["p99_ms"]["median"] >= w3["p50_ms"]["median"]
    assert set(data["workloads"]["W2"]["systems"]) == {"coda"}  # --no-peers

    results_md = (tmp_path / "RESULTS.md").read_text()
    assert "### W2" in results_md and "### W3" in results_md
