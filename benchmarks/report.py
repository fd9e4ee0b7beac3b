"""Write the results: `results/latest.json` and the tables of `RESULTS.md`.

RESULTS.md is partly written by hand (what limits each figure, the profiles).
Only the part between the two markers below is rewritten; the rest is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.workload import Workload

__all__ = ["write"]

START = "<!-- figures: written by `python -m benchmarks`; edits here are lost -->"
END = "<!-- end of figures -->"


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(summary: dict[str, float] | None) -> str:
    if not summary:
        return "-"
    if summary["n"] == 1:
        return _fmt(summary["median"])
    return f"{_fmt(summary['median'])} [{_fmt(summary['min'])}-{_fmt(summary['max'])}]"


def _ratio(coda: float, peer: float, higher_is_better: bool) -> str:
    if not peer or not coda:
        return "-"
    ratio = coda / peer
    better = ratio >= 1 if higher_is_better else ratio <= 1
    return f"{ratio:.2f}x {'(better)' if better else '(worse)'}"


def tables(data: dict[str, Any], workloads: list[Workload]) -> str:
    machine = data["machine"]
    lines = [
        START,
        "",
        f"Measured {machine['date']} on {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gb']} GB; Python {machine['python']}, SQLite "
        f"{machine['sqlite']}; one fsync'd SQLite commit takes "
        f"{machine['fsync_ms']:.1f} ms on this disk. Coda at commit "
        f"{machine.get('coda_commit', '?')}"
        + (
            f" with uncommitted changes to {', '.join(machine['coda_uncommitted'])}"
            if machine.get("coda_uncommitted")
            else ""
        )
        + ". "
        f"Command: `{data['command']}` ({data['repeat']} repeat(s); cells are "
        "median [min-max]).",
        "",
    ]
    for workload in workloads:
        result = data["workloads"].get(workload.name)
        if result is None:
            continue
        systems = result["systems"]
        peers = [p for p in workload.peers if p in systems]
        lines += [f"### {workload.name}: {workload.title}", ""]
        if result.get("command") and result["command"] != data["command"]:
            lines += [
                f"Measured {result.get('measured_at', '?')} by "
                f"`{result['command']}`, Coda at commit "
                f"{result.get('coda_commit', '?')}.",
                "",
            ]
        header = ["figure", "target", "Coda", "met?"]
        for peer in peers:
            header += [peer, f"Coda/{peer}"]
        lines += ["| " + " | ".join(header) + " |"]
        lines += ["| " + " | ".join("---" for _ in header) + " |"]
        coda = systems.get("coda", {})
        for metric in workload.metrics:
            coda_summary = coda.get("summary", {}).get(metric.key)
            target = "-"
            met = "-"
            if metric.target is not None:
                op, bound = metric.target
                target = f"{'≥' if op == '>=' else '≤'} {_fmt(bound)}"
                if coda_summary:
                    met = "yes" if metric.met(coda_summary["median"]) else "**no**"
            row = [metric.label, target, _cell(coda_summary), met]
            for peer in peers:
                entry = systems[peer]
                if "na" in entry:
                    row += ["n/a", "-"]
                    continue
                if "error" in entry and not entry.get("summary"):
                    row += ["failed", "-"]
                    continue
                summary = entry.get("summary", {}).get(metric.key)
                row.append(_cell(summary))
                row.append(
                    _ratio(
                        coda_summary["median"],
                        summary["median"],
                        metric.higher_is_better,
                    )
                    if metric.ratio and summary and coda_summary
                    else "-"
                )
            lines.append("| " + " | ".join(row) + " |")
        counts = []
        for system in ["coda", *peers]:
            entry = systems.get(system, {})
            count = entry.get("summary", {}).get("count")
            if count:
                counts.append(f"{system} {int(count['median']):,}")
        notes = []
        if counts:
            notes.append("Count per repeat: " + ", ".join(counts) + ".")
        loads = []
        for system in ["coda", *peers]:
            load = systems.get(system, {}).get("summary", {}).get("load1")
            if load:
                loads.append(f"{system} {load['median']:.1f}")
        if loads:
            notes.append(
                "1-minute load average after each repeat (median; this machine "
                "has 2 cores and is shared): " + ", ".join(loads) + "."
            )
        for system in ["coda", *peers]:
            entry = systems.get(system, {})
            if "na" in entry:
                notes.append(f"{system} n/a: {entry['na']}.")
            if "error" in entry:
                notes.append(f"{system} failed: `{entry['error'][:300]}`.")
        if notes:
            lines += ["", *notes]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write(
    out: Path, data: dict[str, Any], workloads: list[Workload]
) -> tuple[Path, Path]:
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    json_path = results / "latest.json"
    json_path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    md_path = out / "RESULTS.md"
    figures = tables(data, workloads)
    if md_path.exists():
        text = md_path.read_text()
        if START in text and END in text:
            before = text[: text.index(START)]
            after = text[text.index(END) + len(END) :]
            md_path.write_text(before + figures + after)
            return json_path, md_path
    md_path.write_text("# Benchmark results\n\n" + figures + "\n")
    return json_path, md_path
