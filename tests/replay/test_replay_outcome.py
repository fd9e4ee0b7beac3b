"""`coda.replay.replay` reports what the code does now, beside the record.

A run recorded by one version of a workflow is replayed against another with
the same steps: a fix that changes how the run ends (another error, another
result) must show, or a test asserting the recorded error would pass for code
that no longer raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import coda
from coda.errors import CodaError
from coda.journal.memory import MemoryJournal
from coda.replay import replay

TASKS = coda.Registry()


@coda.task(name="outcome.fetch", registry=TASKS)
async def fetch(order: int) -> dict[str, Any]:
    return {"order": order, "customer": {}}


def _flow(ending: str) -> coda.WorkflowDef[..., Any]:
    """`checkout` as one version of the code ends it, after the same step."""

    async def checkout(order: int) -> Any:
        data = await coda.context.spawn_task(fetch, args={"order": order})
        if ending == "key":
            return data["customer"]["email"]  # KeyError: the bug
        if ending == "value":
            raise ValueError("a different bug")
        return {"total": 200 if ending == "total-200" else -1}

    return coda.workflow(name="checkout", registry=coda.Registry())(checkout)


def _record(ending: str) -> list[Any]:
    flow = _flow(ending)
    registry = coda.Registry(tasks=dict(TASKS.tasks))
    registry.add_workflow(flow)
    journal = MemoryJournal()
    runner = coda.LocalRunner(journal, registry)

    async def go() -> None:
        with contextlib.suppress(CodaError):  # a failed run is recorded too
            await runner.run(flow, {"order": 7}, run_id="r")

    asyncio.run(go())
    return journal.events["r"]


def test_the_same_error_is_reproduced() -> None:
    outcome = replay(_flow("key"), _record("key"))
    assert outcome.status == "failed"
    assert outcome.error is not None and outcome.error.type == "KeyError"
    assert outcome.reproduced


def test_code_that_now_fails_otherwise_shows_its_own_error() -> None:
    outcome = replay(_flow("value"), _record("key"))
    assert outcome.error is not None and outcome.error.type == "ValueError"
    assert outcome.error.message == "a different bug"
    assert outcome.recorded_error is not None
    assert outcome.recorded_error.type == "KeyError"
    assert not outcome.reproduced


def test_code_that_now_returns_otherwise_shows_its_own_result() -> None:
    outcome = replay(_flow("total-minus-1"), _record("total-200"))
    assert outcome.status == "completed"
    assert outcome.result == {"total": -1}
    assert outcome.recorded_result == {"total": 200}
    assert not outcome.reproduced
    same = replay(_flow("total-200"), _record("total-200"))
    assert same.result == {"total": 200} and same.reproduced
