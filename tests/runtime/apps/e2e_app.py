"""The app the end-to-end tests run under `coda run e2e_app`.

The supervisor and its workers import it by that name: the tests put this
directory on their PYTHONPATH. Tasks leave traces the tests can check from
outside the processes: lines appended to a side-effect file (one line per try
that got that far, so a task that ran twice shows twice) and marker files that
say which worker process a try ran in.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import coda


def append_line(path: str, line: str) -> None:
    """Append one line with a single O_APPEND write: whole lines, any writer."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def write_marker(path: str, text: str) -> None:
    """Write a file atomically, so that a reader never sees it half written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


# Sequential steps with a side effect each.


@coda.task(backoff=0.05)
def step(side_file: str, tag: str, index: int, delay: float) -> int:
    time.sleep(delay)
    append_line(side_file, f"{tag} {index}")
    return index * index


@coda.workflow()
async def chain(side_file: str, tag: str, steps: int, delay: float) -> dict[str, Any]:
    results = []
    for index in range(steps):
        results.append(
            await coda.context.spawn_task(
                step,
                args={
                    "side_file": side_file,
                    "tag": tag,
                    "index": index,
                    "delay": delay,
                },
            )
        )
    return {"tag": tag, "results": results}


# A try that waits to be interrupted: the first try of a step writes its
# worker's pid and sleeps; a later try finds the marker and returns at once.


@coda.task(backoff=0.05, max_retries=0)
async def mark_and_sleep(marker: str, seconds: float) -> dict[str, Any]:
    if os.path.exists(marker):
        first = int(Path(marker).read_text())
        return {"first_pid": first, "pid": os.getpid()}
    write_marker(marker, str(os.getpid()))
    await asyncio.sleep(seconds)
    return {"first_pid": os.getpid(), "pid": os.getpid()}


@coda.task(max_retries=0)
def mark_and_sleep_sync(marker: str, seconds: float) -> dict[str, Any]:
    if os.path.exists(marker):
        first = int(Path(marker).read_text())
        return {"first_pid": first, "pid": os.getpid()}
    write_marker(marker, str(os.getpid()))
    time.sleep(seconds)
    return {"first_pid": os.getpid(), "pid": os.getpid()}


@coda.workflow()
async def interruptible(marker: str, seconds: float, sync: bool = False) -> Any:
    task = mark_and_sleep_sync if sync else mark_and_sleep
    outcome = await coda.context.spawn_task(
        task, args={"marker": marker, "seconds": seconds}
    )
    return {"marker": marker, **outcome}


# Failing, and failing until a flag file appears.


@coda.task(max_retries=0)
def explode(message: str) -> None:
    raise ValueError(message)


@coda.workflow()
async def doomed(message: str) -> None:
    await coda.context.spawn_task(explode, args={"message": message})


def _file_name(hex_bytes: str) -> str:
    # A name that is not UTF-8, as os.listdir gives it: with lone surrogates.
    return os.fsdecode(bytes.fromhex(hex_bytes))


@coda.task(max_retries=0)
def open_missing(hex_bytes: str) -> None:
    raise FileNotFoundError(f"no input file {_file_name(hex_bytes)}")


@coda.workflow()
async def missing_input(hex_bytes: str, in_workflow: bool = False) -> None:
    if in_workflow:
        raise ValueError(f"bad input file {_file_name(hex_bytes)}")
    await coda.context.spawn_task(open_missing, args={"hex_bytes": hex_bytes})


@coda.task(max_retries=0)
def prepare(side_file: str, tag: str) -> str:
    append_line(side_file, f"{tag} prepare")
    return f"prepared {tag}"


@coda.task(max_retries=0)
def check_flag(side_file: str, tag: str, flag: str) -> str:
    append_line(side_file, f"{tag} check")
    if not os.path.exists(flag):
        raise RuntimeError(f"flag {flag} is not set")
    return "flag set"


@coda.workflow()
async def flaky(side_file: str, tag: str, flag: str) -> dict[str, str]:
    prepared = await coda.context.spawn_task(
        prepare, args={"side_file": side_file, "tag": tag}, cache_key=[tag, "prepare"]
    )
    checked = await coda.context.spawn_task(
        check_flag, args={"side_file": side_file, "tag": tag, "flag": flag}
    )
    return {"prepare": prepared, "check": checked}


@coda.workflow(max_retries=1, backoff=1.5)
async def flaky_retrying(side_file: str, tag: str, flag: str) -> dict[str, str]:
    """`flaky`, whose attempt is tried again 1.5 s after it fails."""
    return await flaky.fn(side_file, tag, flag)


# Quick.


@coda.task
def double(x: int) -> int:
    return 2 * x


@coda.workflow()
async def quick(x: int) -> int:
    return await coda.context.spawn_task(double, args={"x": x}) + 1


@coda.workflow()
async def echo(value: Any) -> Any:
    return value


# A task that announces itself, then finishes only if nobody cancels it.


@coda.task(max_retries=0)
async def sleep_then_mark(started: str, finished: str, seconds: float) -> str:
    write_marker(started, str(os.getpid()))
    await asyncio.sleep(seconds)
    write_marker(finished, "finished")
    return "finished"


@coda.workflow()
async def cancellable(started: str, finished: str, seconds: float) -> str:
    result: str = await coda.context.spawn_task(
        sleep_then_mark,
        args={"started": started, "finished": finished, "seconds": seconds},
    )
    return result


# Plain-def tries left running by runs that ended, and tries that follow them.


@coda.task(timeout=1.0)
def nap_in_time(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@coda.workflow()
async def punctual(seconds: float) -> str:
    result: str = await coda.context.spawn_task(nap_in_time, args={"seconds": seconds})
    return result


@coda.task()
def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@coda.workflow()
async def race(seconds: float) -> str:
    """Returns once `double` is done, leaving its `nap` running."""
    slow = coda.context.spawn_task(nap, args={"seconds": seconds})
    fast = coda.context.spawn_task(double, args={"x": 1})
    await asyncio.wait([slow, fast], return_when=asyncio.FIRST_COMPLETED)
    return "fast won"


# Workflow code that takes its worker down: it blocks the worker's event loop
# (heartbeats go unanswered) or ends the process.


@coda.workflow()
async def takes_host_down(how: str, seconds: float = 30.0) -> str:
    if how == "exit":
        os._exit(3)
    time.sleep(seconds)  # against the rules: it blocks the worker's loop
    return "woke up"


@coda.workflow()
async def bystander(seconds: float) -> str:
    return await coda.context.spawn_task(nap, args={"seconds": seconds})


@coda.task(max_retries=0)
def wait_for_file(path: str, limit_s: float = 30.0) -> bool:
    deadline = time.monotonic() + limit_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@coda.workflow()
async def gated_echo(value: Any, gate: str) -> Any:
    """`value`, once the file `gate` exists."""
    await coda.context.spawn_task(wait_for_file, args={"path": gate})
    return value


@coda.workflow()
async def waits_for_nothing(after_a_task: bool = False) -> str:
    """Awaits a future that nothing resolves: the run can never go on."""
    if after_a_task:
        await coda.context.spawn_task(double, args={"x": 1})
    await asyncio.get_running_loop().create_future()
    return "never"


@coda.workflow()
async def forgets_a_task() -> str:
    """Spawns a task and returns without awaiting it."""
    coda.context.spawn_task(double, args={"x": 1})
    return "done"
