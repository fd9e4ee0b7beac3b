"""What an activation carries: the workflow and its arguments only when full.

A host that holds a run's instance needs only the new events; the arguments
(a run's whole payload) are sent to make a new instance, from the whole
history. The supervisor runs in this process with one stand-in worker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from coda.journal.events import TaskCompleted

from .test_stale_answers import _app_importable, _schedule, _stand_in

__all__ = ["_app_importable"]  # the fixture, used by every test here


def test_only_a_full_activation_carries_the_workflow_and_its_arguments(
    tmp_path: Path,
) -> None:
    asyncio.run(_activations(tmp_path))


async def _activations(tmp_path: Path) -> None:
    async with _stand_in(tmp_path) as (supervisor, worker, outbox, _):
        assert await supervisor.submit("quick", {"x": 4}, "r1") == ("r1", True)
        supervisor._on_worker_message(worker, _schedule("r1", 1, x=4))
        for _ in range(100):
            tries = [m for m in outbox.sent if m["op"] == "task"]
            if tries:
                break
            await asyncio.sleep(0.01)
        (task,) = tries
        outcome = {
            "op": "outcome",
            "run": "r1",
            "attempt": task["attempt"],
            "step": task["step"],
            "try": task["try"],
            "ok": True,
            "result": 8,
        }
        supervisor._on_worker_message(worker, outcome)
        for _ in range(100):
            activations = [m for m in outbox.sent if m["op"] == "activate"]
            if len(activations) == 2:
                break
            await asyncio.sleep(0.01)

        first, second = activations
        assert first["full"] and first["workflow"] == "quick"
        assert first["args"] == {"x": 4}
        # The host holds the instance: the completion alone, nothing to make
        # a new instance from.
        assert not second["full"]
        assert "args" not in second and "workflow" not in second
        assert [e["type"] for e in second["events"]] == [TaskCompleted.__name__]

        # A host that lost the instance asks again, and gets everything.
        supervisor._on_worker_message(
            worker, {"op": "resync", "run": "r1", "n": second["n"]}
        )
        third = [m for m in outbox.sent if m["op"] == "activate"][-1]
        assert third["full"] and third["args"] == {"x": 4}
        assert third["workflow"] == "quick"
