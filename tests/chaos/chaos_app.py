"""The app the chaos tests run under `coda run tests.chaos.chaos_app`.

A mixed workload whose every result is a pure function of its arguments, so
that a run that went through any number of crashes can be compared with the
same run done once, crash-free (`reference.py`):

* `sequence`: tasks one after another, `def` and `async def` alternating;
* `fanout`: a gather of tasks, then one more on their results;
* `flaky_steps`: a task that fails on purpose on its first executions and is
  retried (retry_on, backoff), and a task that fails for good, whose
  `TaskError` the workflow catches;
* `second_attempt`: a workflow that raises on attempt 1 after some tasks with a
  `cache_key`, and on attempt 2 reuses them and runs one more;
* `slow`: longer steps, for cancelling a run while it runs;
* `doomed_run`: a run that fails for good.

Every execution of a task appends one line to the side-effect file `side`, with
a single O_APPEND write, before doing anything else:

    RUN ATTEMPT LABEL START_NS PID TOKEN

(`LABEL` names the step within its attempt; `START_NS` is `time.time_ns()`
when the execution began). The checks read it back to count executions.

A task cannot know its try number, so a deliberate failure is decided by the
number of executions so far of the same step, kept in a file per step under
`counters` (one byte appended per execution): executions 1..fail_first fail.
An execution lost to a crash also counts, so the number of deliberate
failures in a history varies from run to run; the result does not.

The chaos test kills workers on purpose, and each lost worker counts against
the tries it was running (`max_lost_workers`, see the README). That budget is
what stops a task that crashes its worker every time; here the crashes are
ours, not the tasks', so it is set out of reach: a run's outcome must not
depend on how many times the test killed workers under it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from typing import Any

import coda

# Out of reach on purpose: see the module's docstring.
LOST_WORKERS = 1000
BACKOFF = 0.01
MAX_BACKOFF = 0.05


def _note(side: str, run: str, attempt: int, label: str) -> None:
    line = (
        f"{run} {attempt} {label} {time.time_ns()} {os.getpid()} "
        f"{secrets.token_hex(4)}\n"
    )
    fd = os.open(side, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _executions(counters: str, run: str, attempt: int, label: str) -> int:
    """Count this execution of the step; return how many there were, it included."""
    path = os.path.join(counters, f"{run}.{attempt}.{label}")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x")
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def mix(value: int, label: str) -> int:
    """The work: any deterministic function of the arguments will do."""
    acc = value
    for ch in label:
        acc = (acc * 31 + ord(ch)) % 1_000_003
    return acc


# Tasks. Every one takes the side-effect file, the counters folder, the run and
# attempt it belongs to and its label, so that its line says which step it is.


@coda.task(max_lost_workers=LOST_WORKERS, backoff=BACKOFF, max_backoff=MAX_BACKOFF)
def compute(
    side: str,
    counters: str,
    run: str,
    attempt: int,
    label: str,
    value: int,
    delay: float,
) -> int:
    _note(side, run, attempt, label)
    time.sleep(delay)
    return mix(value, label)


@coda.task(max_lost_workers=LOST_WORKERS, backoff=BACKOFF, max_backoff=MAX_BACKOFF)
async def acompute(
    side: str,
    counters: str,
    run: str,
    attempt: int,
    label: str,
    value: int,
    delay: float,
) -> int:
    _note(side, run, attempt, label)
    await asyncio.sleep(delay)
    return mix(value, label)


@coda.task(
    retry_on=[ConnectionError],
    max_retries=4,
    max_lost_workers=LOST_WORKERS,
    backoff=BACKOFF,
    max_backoff=MAX_BACKOFF,
)
def flaky(
    side: str,
    counters: str,
    run: str,
    attempt: int,
    label: str,
    value: int,
    delay: float,
    fail_first: int,
) -> int:
    _note(side, run, attempt, label)
    done = _executions(counters, run, attempt, label)
    time.sleep(delay)
    if done <= fail_first:
        raise ConnectionError(f"{label}: execution {done} fails on purpose")
    return mix(value, label)


@coda.task(
    retry_on=[ValueError],
    max_retries=1,
    max_lost_workers=LOST_WORKERS,
    backoff=BACKOFF,
    max_backoff=MAX_BACKOFF,
)
def doomed(
    side: str,
    counters: str,
    run: str,
    attempt: int,
    label: str,
    value: int,
    delay: float,
) -> int:
    _note(side, run, attempt, label)
    raise ValueError(f"{label} always fails")


# Workflows.


def _spawn(
    task: coda.TaskDef[..., Any],
    common: dict[str, Any],
    label: str,
    value: int,
    cache_key: list[Any] | None = None,
    **extra: Any,
) -> asyncio.Future[int]:
    args = {
        "side": common["side"],
        "counters": common["counters"],
        "run": coda.context.run_id(),
        "attempt": coda.context.attempt(),
        "label": label,
        "value": value,
        "delay": common["delay"],
        **extra,
    }
    return coda.context.spawn_task(task, args=args, cache_key=cache_key)


@coda.workflow()
async def sequence(
    side: str, counters: str, seed: int, delay: float, length: int
) -> list[int]:
    common = {"side": side, "counters": counters, "delay": delay}
    value, out = seed, []
    for index in range(length):
        task = compute if index % 2 == 0 else acompute
        value = await _spawn(task, common, f"s{index}", value)
        out.append(value)
    coda.context.now()  # a recorded side effect, replayed after a crash
    return out


@coda.workflow()
async def fanout(
    side: str, counters: str, seed: int, delay: float, width: int
) -> dict[str, Any]:
    common = {"side": side, "counters": counters, "delay": delay}
    parts = await asyncio.gather(
        *(
            _spawn(compute if i % 2 else acompute, common, f"g{i}", seed + i)
            for i in range(width)
        )
    )
    total = await _spawn(compute, common, "sum", sum(parts))
    return {"parts": list(parts), "total": total}


@coda.workflow()
async def flaky_steps(
    side: str, counters: str, seed: int, delay: float, fail_first: int
) -> dict[str, Any]:
    common = {"side": side, "counters": counters, "delay": delay}
    first = await _spawn(flaky, common, "f0", seed, fail_first=fail_first)
    try:
        await _spawn(doomed, common, "d0", first)
        caught = None
    except coda.TaskError as exc:
        caught = exc.remote_type
    second = await _spawn(compute, common, "f1", first)
    return {"first": first, "second": second, "caught": caught}


@coda.workflow(max_retries=1, retry_on=[RuntimeError], backoff=0.02)
async def second_attempt(
    side: str, counters: str, seed: int, delay: float
) -> list[int]:
    common = {"side": side, "counters": counters, "delay": delay}
    a = await _spawn(compute, common, "c0", seed, cache_key=["c0"])
    b, c = await asyncio.gather(
        _spawn(acompute, common, "c1", a, cache_key=["c1"]),
        _spawn(compute, common, "c2", a, cache_key=["c2"]),
    )
    if coda.context.attempt() == 1:
        raise RuntimeError("attempt 1 fails on purpose, after its cached steps")
    d = await _spawn(compute, common, "u0", b + c)  # no cache key: attempt 2 only
    return [a, b, c, d]


@coda.workflow()
async def slow(side: str, counters: str, seed: int, delay: float, length: int) -> int:
    common = {"side": side, "counters": counters, "delay": delay}
    value = seed
    for index in range(length):
        value = await _spawn(compute, common, f"w{index}", value)
    return value


@coda.workflow()
async def doomed_run(side: str, counters: str, seed: int, delay: float) -> int:
    common = {"side": side, "counters": counters, "delay": delay}
    value = await _spawn(compute, common, "x0", seed)
    raise ValueError(f"the run fails on purpose after computing {value}")
