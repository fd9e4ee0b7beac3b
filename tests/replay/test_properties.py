"""The key property of replay: an interrupted run ends as if it never was.

A run is interrupted between two events (the process dies; the journal keeps
what it had appended) and driven again from its history by a fresh
`LocalRunner`. Whatever the cut, it must end with the same history and result
as the same run left alone.

The runs come from one interpreter workflow whose behaviour is fully decided by
its JSON arguments, a list of ops that hypothesis generates: sequential tasks,
gathers, tasks that fail a given number of times (retried by policy or not,
caught by the workflow or not), cache keys, side effects, and attempts that
fail on purpose (the workflow retries, reusing cached results).

Determinism of the world around the code. A task's outcome depends on its
arguments and on how many times a task with those arguments has run to an
outcome in this run so far; that count is derived from the history, so a
resumed run starts from the count its history implies (an interrupted try,
never recorded, does not count). Side-effect values come from a counter that a
resumed run likewise starts at the number its history records. The clock is
fake and jumps far at every reading, so every backoff is over at once and
nothing sleeps for real.

What must be identical, and what may differ (`compare` below):

* identical: the run-level events in order (submission, attempts started,
  attempts failed and whether each was retried, completion or failure, with
  results and errors); every step record, by (attempt, step): kind, task name,
  arguments, cache key, side-effect value, reused result; every step's own
  sequence of outcomes (completed with its result, failed with its error
  type and message, retried or not); the run's final status and result.
* may differ, and only like this: the interrupted tries. A try that had
  started when the run was cut is recorded as failed with `Interrupted` and
  started again, so the resumed history has exactly one extra `TaskFailed`
  (Interrupted) and one extra `TaskStarted` per try that was running at the
  cut, and the later try numbers of that step are shifted by one. `at`
  timestamps and the exact `retry_at` values come from the clock and differ;
  whether a failure was retried does not. The interleaving of different steps'
  events within a gather may differ too (which of two concurrent tries is
  started first after the restart); each step's own order may not.
"""

from __future__ import annotations

import asyncio
import collections
import json
import uuid
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

import coda
from coda.errors import RunFailedError, TaskError
from coda.journal import events as ev
from coda.journal.memory import MemoryJournal
from coda.state import INTERRUPTED, StepStatus, fold

REGISTRY = coda.Registry()
# How many times a task with given arguments ran to an outcome, by arguments.
EXECUTIONS: collections.Counter[str] = collections.Counter()


def _args_key(args: dict[str, Any]) -> str:
    return json.dumps(args, sort_keys=True)


def _outcome(args: dict[str, Any]) -> Any:
    EXECUTIONS[_args_key(args)] += 1
    count = EXECUTIONS[_args_key(args)]
    if count <= args["fail"]:
        raise ConnectionRefusedError(f"{args['id']} failed, execution {count}")
    return {"id": args["id"], "execution": count}


@coda.task(
    name="prop.flaky",
    registry=REGISTRY,
    retry_on=[OSError],
    max_retries=2,
    backoff=0.001,
    max_backoff=0.01,
)
async def flaky(id: str, fail: int) -> Any:
    return _outcome({"id": id, "fail": fail})


@coda.task(name="prop.fragile", registry=REGISTRY)  # no retries
async def fragile(id: str, fail: int) -> Any:
    return _outcome({"id": id, "fail": fail})


TASKS = {"prop.flaky": flaky, "prop.fragile": fragile}


def _spawn(op: dict[str, Any]) -> asyncio.Future[Any]:
    return coda.context.spawn_task(
        TASKS[op["task"]],
        {"id": op["id"], "fail": op["fail"]},
        cache_key=[op["id"]] if op["key"] else None,
    )


def _shown(value: Any) -> Any:
    if isinstance(value, TaskError):
        return ["error", value.remote_type, value.remote_message]
    return value


@coda.workflow(name="prop.shape", registry=REGISTRY, max_retries=2, backoff=0.001)
async def shape(ops: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for op in ops:
        kind = op["op"]
        if kind == "task":
            try:
                out.append(await _spawn(op))
            except TaskError as exc:
                if not op["catch"]:
                    raise
                out.append(_shown(exc))
        elif kind == "gather":
            # return_exceptions: the code moves on only once every branch has
            # its outcome, so no try is in flight when an attempt ends.
            results = await asyncio.gather(
                *(_spawn(item) for item in op["items"]), return_exceptions=True
            )
            out.append([_shown(r) for r in results])
        elif kind == "now":
            out.append(coda.context.now().isoformat())
        elif kind == "uuid4":
            out.append(str(coda.context.uuid4()))
        elif kind == "random":
            out.append(coda.context.random())
        elif kind == "fail_before" and coda.context.attempt() < op["attempt"]:
            raise RuntimeError(f"attempt {coda.context.attempt()} fails on purpose")
    return out


# Generated shapes.

task_fields = {
    "task": st.sampled_from(sorted(TASKS)),
    "fail": st.integers(0, 5),
    "key": st.booleans(),
}
task_op = st.fixed_dictionaries(
    {"op": st.just("task"), **task_fields, "catch": st.booleans()}
)
gather_op = st.fixed_dictionaries(
    {
        "op": st.just("gather"),
        "items": st.lists(st.fixed_dictionaries(task_fields), min_size=1, max_size=3),
    }
)
side_effect_op = st.sampled_from([{"op": "now"}, {"op": "uuid4"}, {"op": "random"}])
fail_op = st.fixed_dictionaries(
    {"op": st.just("fail_before"), "attempt": st.integers(2, 4)}
)


def _with_ids(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for index, op in enumerate(ops):
        if op["op"] == "task":
            op["id"] = f"t{index}"
        elif op["op"] == "gather":
            for branch, item in enumerate(op["items"]):
                item["id"] = f"g{index}.{branch}"
    return ops


shapes = st.lists(
    st.one_of(task_op, gather_op, side_effect_op, fail_op), min_size=1, max_size=6
).map(_with_ids)


# The world around the code, made deterministic.


class JumpingClock:
    """Jumps far at every reading: every backoff is over at the next one."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


class CountingSource:
    def __init__(self, used: int) -> None:
        self.n = used

    def now(self) -> float:
        self.n += 1
        return 1_700_000_000.0 + self.n

    def uuid4(self) -> str:
        self.n += 1
        return str(uuid.UUID(int=self.n))

    def random(self) -> float:
        self.n += 1
        return self.n / 1024


def _interrupted(event: ev.Event) -> bool:
    return isinstance(event, ev.TaskFailed) and event.error.is_a((INTERRUPTED,))


def executions_in(history: list[ev.Event]) -> collections.Counter[str]:
    """How many times each task's arguments ran to an outcome, per `history`."""
    args: dict[tuple[int, int], str] = {}
    counts: collections.Counter[str] = collections.Counter()
    for event in history:
        if isinstance(event, ev.TaskScheduled):
            args[(event.attempt, event.step)] = _args_key(event.args)
        elif isinstance(event, (ev.TaskCompleted, ev.TaskFailed)) and not (
            _interrupted(event)
        ):
            counts[args[(event.attempt, event.step)]] += 1
    return counts


async def drive(
    journal: MemoryJournal, prefix: list[ev.Event] | None, ops: list[Any]
) -> Any:
    """Run `ops` afresh (no prefix) or resume the run from `prefix`."""
    history = prefix or []
    EXECUTIONS.clear()
    EXECUTIONS.update(executions_in(history))
    used = sum(isinstance(e, ev.SideEffectRecorded) for e in history)
    start = history[-1].at + 1_000.0 if history else 1_000.0
    runner = coda.LocalRunner(
        journal, REGISTRY, clock=JumpingClock(start), side_effects=CountingSource(used)
    )
    try:
        if prefix is None:
            return ("completed", await runner.run(shape, {"ops": ops}, run_id="r"))
        await journal.append(prefix)
        return ("completed", await runner.drive("r"))
    except RunFailedError as exc:
        return ("failed", exc.error_type, exc.error_message)


# What is compared.

RUN_LEVEL = (
    ev.RunSubmitted,
    ev.AttemptStarted,
    ev.AttemptFailed,
    ev.RunCompleted,
    ev.RunFailed,
)
STEP_RECORDS = (ev.TaskScheduled, ev.TaskReused, ev.SideEffectRecorded)


def _fields(event: ev.Event, *dropped: str) -> tuple[Any, ...]:
    skip = {"run_id", "seq", "at", *dropped}
    names = [f.name for f in attrs.fields(type(event)) if f.name not in skip]
    return (type(event).__name__, *((name, getattr(event, name)) for name in names))


def run_level(history: list[ev.Event]) -> list[Any]:
    return [
        (
            *_fields(e, "retry_at", "error"),
            _error(e),
            getattr(e, "retry_at", None) is None,
        )
        for e in history
        if isinstance(e, RUN_LEVEL)
    ]


def _error(event: ev.Event) -> Any:
    error = getattr(event, "error", None)
    return None if error is None else (error.type, error.message)


def step_records(history: list[ev.Event]) -> dict[tuple[int, int], Any]:
    return {
        (e.attempt, e.step): _fields(e) for e in history if isinstance(e, STEP_RECORDS)
    }


def step_outcomes(history: list[ev.Event]) -> dict[tuple[int, int], list[Any]]:
    out: dict[tuple[int, int], list[Any]] = collections.defaultdict(list)
    for e in history:
        if isinstance(e, ev.TaskCompleted):
            out[(e.attempt, e.step)].append(("completed", e.result, e.cache_key))
        elif isinstance(e, ev.TaskFailed) and not _interrupted(e):
            out[(e.attempt, e.step)].append(
                ("failed", e.error.type, e.error.message, e.retry_at is None)
            )
    return dict(out)


def compare(alone: list[ev.Event], resumed: list[ev.Event], cut: int) -> None:
    assert resumed[:cut] == alone[:cut]
    assert run_level(resumed) == run_level(alone)
    assert step_records(resumed) == step_records(alone)
    assert step_outcomes(resumed) == step_outcomes(alone)

    # The only extra events: per try running at the cut, its interruption and
    # its restart.
    state = fold(alone[:cut])
    assert state is not None
    running = {k for k, s in state.steps.items() if s.status is StepStatus.STARTED}
    interrupted = [(e.attempt, e.step) for e in resumed if _interrupted(e)]
    assert sorted(interrupted) == sorted(running)
    assert not any(_interrupted(e) for e in alone)
    assert len(resumed) == len(alone) + 2 * len(running)
    starts = collections.Counter(
        (e.attempt, e.step) for e in resumed if isinstance(e, ev.TaskStarted)
    )
    starts.subtract((e.attempt, e.step) for e in alone if isinstance(e, ev.TaskStarted))
    assert +starts == collections.Counter(running)


def possible_cut(history: list[ev.Event], cut: int) -> bool:
    """Whether a run can stop with `history[:cut]` in its journal.

    Everywhere but between a final `AttemptFailed` and its `RunFailed`: the two
    are decided together and always appended in one append, which the journal
    makes all or nothing (see `coda.journal.base.Journal.append`).
    """
    last = history[cut - 1]
    return not (isinstance(last, ev.AttemptFailed) and last.retry_at is None)


@settings(max_examples=60, deadline=None)
@given(shapes, st.data())
def test_a_run_interrupted_anywhere_ends_as_if_it_never_was(
    ops: list[dict[str, Any]], data: st.DataObject
) -> None:
    async def scenario() -> None:
        journal = MemoryJournal()
        outcome = await drive(journal, None, ops)
        alone = journal.events["r"]
        cuts = [cut for cut in range(1, len(alone)) if possible_cut(alone, cut)]
        if len(cuts) > 16:  # long histories: a sample of the cuts
            cuts = data.draw(st.lists(st.sampled_from(cuts), min_size=16, max_size=16))
        for cut in cuts:
            resumed_journal = MemoryJournal()
            resumed_outcome = await drive(resumed_journal, alone[:cut], ops)
            resumed = resumed_journal.events["r"]
            assert resumed_outcome == outcome, f"cut at {cut}"
            compare(alone, resumed, cut)

    asyncio.run(scenario())


def test_the_shapes_cover_what_they_should() -> None:
    # The property above proves little if the shapes never retry, reuse or
    # fail: check that generated runs do all of it.
    seen: collections.Counter[str] = collections.Counter()

    @settings(max_examples=60, deadline=None, database=None, derandomize=True)
    @given(shapes)
    def collect(ops: list[dict[str, Any]]) -> None:
        journal = MemoryJournal()
        outcome = asyncio.run(drive(journal, None, ops))
        seen[outcome[0]] += 1
        for event in journal.events["r"]:
            label = type(event).__name__
            if isinstance(event, (ev.TaskFailed, ev.AttemptFailed)):
                label += ":retry" if event.retry_at is not None else ":final"
            seen[label] += 1

    collect()
    for wanted in (
        "completed",
        "failed",
        "TaskReused",
        "TaskFailed:retry",
        "TaskFailed:final",
        "AttemptFailed:retry",
        "AttemptFailed:final",
        "SideEffectRecorded",
    ):
        assert seen[wanted] > 0, (wanted, seen)
