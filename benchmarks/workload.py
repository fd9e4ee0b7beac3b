"""How a workload describes itself to the runner and the report."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

__all__ = ["Metric", "Workload"]

Metrics = dict[str, float]


@attrs.frozen
class Metric:
    key: str
    label: str
    higher_is_better: bool = True
    # The target for Coda: (">=" or "<=", value); None when there is none.
    target: tuple[str, float] | None = None
    # Whether the ratio Coda/peer is meaningful for this figure.
    ratio: bool = True

    def met(self, value: float) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target
        return value >= bound if op == ">=" else value <= bound


@attrs.frozen
class Workload:
    name: str
    title: str
    metrics: tuple[Metric, ...]
    # measure(system, quick) -> one repeat's figures. Systems: "coda" and peers.
    measure: Callable[[str, bool], Awaitable[Metrics]]
    # The peers measured beside Coda.
    peers: tuple[str, ...] = ("dbos", "dbos-wal", "huey")
    # Peers this workload has no equivalent for, with the reason.
    not_applicable: dict[str, str] = attrs.field(factory=dict)
    notes: str = ""
    # Extra details of one repeat for the JSON (counts, batch sizes...).
    details: dict[str, Any] = attrs.field(factory=dict)
