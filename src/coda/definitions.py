"""Declaring tasks and workflows: `@coda.task`, `@coda.workflow` and the registry.

A decorated function stays callable as before (a unit test can call a task
directly); the decorator wraps it in a `TaskDef` or `WorkflowDef` that carries
its name and retry policy, and registers it by name, because workers look work
up by name: a name, not a Python object, is what the journal records.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

import attrs

from coda.errors import AppImportError, UnknownNameError
from coda.journal.events import RetryPolicy, check_number, qualified_name

__all__ = [
    "Registry",
    "TaskDef",
    "WorkflowDef",
    "default_registry",
    "load_app",
    "task",
    "workflow",
]

P = ParamSpec("P")
R = TypeVar("R")


@attrs.frozen(eq=False)
class TaskDef(Generic[P, R]):
    """A task: a unit of work with side effects, run by a worker, retried by policy."""

    name: str
    fn: Callable[P, R]
    policy: RetryPolicy
    timeout: float | None
    is_async: bool

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)


@attrs.frozen(eq=False)
class WorkflowDef(Generic[P, R]):
    """A workflow: deterministic `async def` code that spawns tasks."""

    name: str
    fn: Callable[P, R]
    policy: RetryPolicy

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)


@attrs.define
class Registry:
    """Tasks and workflows by name."""

    tasks: dict[str, TaskDef[Any, Any]] = attrs.field(factory=dict)
    workflows: dict[str, WorkflowDef[Any, Any]] = attrs.field(factory=dict)

    def add_task(self, definition: TaskDef[Any, Any]) -> None:
        _check_unique(self.tasks.get(definition.name), definition, "task")
        self.tasks[definition.name] = definition

    def add_workflow(self, definition: WorkflowDef[Any, Any]) -> None:
        _check_unique(self.workflows.get(definition.name), definition, "workflow")
        self.workflows[definition.name] = definition

    def task(self, name: str) -> TaskDef[Any, Any]:
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownNameError(
                f"no task named {name!r} is registered; known tasks: "
                f"{_known(self.tasks)}. Is the app module that defines it imported?"
            ) from None

    def workflow(self, name: str) -> WorkflowDef[Any, Any]:
        try:
            return self.workflows[name]
        except KeyError:
            raise UnknownNameError(
                f"no workflow named {name!r} is registered; known workflows: "
                f"{_known(self.workflows)}. Is the app module that defines it "
                "imported?"
            ) from None


def _known(names: Iterable[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed[:20]) + (" ..." if len(listed) > 20 else "") or "none"


def _check_unique(old: Any, new: Any, kind: str) -> None:
    # Re-importing the same module (a reload, a test collected twice) is fine; two
    # different functions under one name would make the journal ambiguous.
    if old is None:
        return
    same = (old.fn.__module__, old.fn.__qualname__) == (
        new.fn.__module__,
        new.fn.__qualname__,
    )
    if not same:
        raise ValueError(
            f"{kind} name {new.name!r} is already used by "
            f"{old.fn.__module__}.{old.fn.__qualname__}; pass name=... to one of them"
        )


default_registry = Registry()


def _policy(
    definition: str,
    max_retries: int,
    retry_on: Iterable[type[BaseException]],
    backoff: float,
    backoff_factor: float,
    max_backoff: float,
    max_lost_workers: int,
) -> RetryPolicy:
    """The retry policy `definition` (`task f`) declares, refused with the
    parameter named if the journal could not hold it (see `RetryPolicy`)."""
    if isinstance(retry_on, type) or not isinstance(retry_on, Iterable):
        raise TypeError(
            f"{definition}: retry_on={retry_on!r}: a list of exception classes, "
            "such as [OSError]"
        )
    retry_on = list(retry_on)
    for cls in retry_on:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(
                f"{definition}: retry_on holds {cls!r}: a list of exception "
                "classes, such as [OSError]"
            )
    try:
        return RetryPolicy(
            max_retries=max_retries,
            retry_on=tuple(qualified_name(cls) for cls in retry_on),
            backoff=backoff,
            backoff_factor=backoff_factor,
            max_backoff=max_backoff,
            max_lost_workers=max_lost_workers,
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{definition}: {exc}") from None


def _timeout(definition: str, timeout: float | None) -> float | None:
    # Journaled with each of the task's steps, and 0 would read as "none given"
    # (the supervisor's default) in one place and as "no time at all" in another.
    if timeout is not None:
        allowed = (
            "a finite number of seconds > 0, or None for the supervisor's "
            "default (coda run --task-timeout)"
        )
        try:
            check_number("timeout", timeout, allowed, above_zero=True)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{definition}: {exc}") from None
    return timeout


@overload
def task(fn: Callable[P, R], /) -> TaskDef[P, R]: ...


@overload
def task(
    *,
    name: str | None = None,
    retry_on: Iterable[type[BaseException]] = (Exception,),
    max_retries: int = 0,
    backoff: float = 1.0,
    backoff_factor: float = 2.0,
    max_backoff: float = 60.0,
    max_lost_workers: int = 2,
    timeout: float | None = None,
    registry: Registry | None = None,
) -> Callable[[Callable[P, R]], TaskDef[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    retry_on: Iterable[type[BaseException]] = (Exception,),
    max_retries: int = 0,
    backoff: float = 1.0,
    backoff_factor: float = 2.0,
    max_backoff: float = 60.0,
    max_lost_workers: int = 2,
    timeout: float | None = None,
    registry: Registry | None = None,
) -> TaskDef[P, R] | Callable[[Callable[P, R]], TaskDef[P, R]]:
    """Declare a task. `async def` tasks run on the worker's loop, plain `def`
    tasks in a thread. A failure whose type is in `retry_on` is retried up to
    `max_retries` times with exponential `backoff`; `timeout` bounds one try
    (start to close), after which the worker is replaced."""

    def wrap(f: Callable[P, R]) -> TaskDef[P, R]:
        declared = f"task {name or f.__name__}"
        policy = _policy(
            declared,
            max_retries,
            retry_on,
            backoff,
            backoff_factor,
            max_backoff,
            max_lost_workers,
        )
        definition = TaskDef(
            name=name or f.__name__,
            fn=f,
            policy=policy,
            timeout=_timeout(declared, timeout),
            is_async=inspect.iscoroutinefunction(f),
        )
        (registry or default_registry).add_task(definition)
        return definition

    return wrap(fn) if fn is not None else wrap


@overload
def workflow(fn: Callable[P, R], /) -> WorkflowDef[P, R]: ...


@overload
def workflow(
    *,
    name: str | None = None,
    max_retries: int = 0,
    retry_on: Iterable[type[BaseException]] = (Exception,),
    backoff: float = 1.0,
    backoff_factor: float = 2.0,
    max_backoff: float = 60.0,
    registry: Registry | None = None,
) -> Callable[[Callable[P, R]], WorkflowDef[P, R]]: ...


def workflow(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    max_retries: int = 0,
    retry_on: Iterable[type[BaseException]] = (Exception,),
    backoff: float = 1.0,
    backoff_factor: float = 2.0,
    max_backoff: float = 60.0,
    registry: Registry | None = None,
) -> WorkflowDef[P, R] | Callable[[Callable[P, R]], WorkflowDef[P, R]]:
    """Declare a workflow (an `async def`). When it raises an error in `retry_on`,
    a new attempt starts from the top, up to `max_retries` times; tasks spawned
    with a `cache_key` that completed in an earlier attempt are not run again."""

    def wrap(f: Callable[P, R]) -> WorkflowDef[P, R]:
        if not inspect.iscoroutinefunction(f):
            raise TypeError(f"workflow {f.__qualname__} must be an async def")
        declared = f"workflow {name or f.__name__}"
        policy = _policy(
            declared, max_retries, retry_on, backoff, backoff_factor, max_backoff, 0
        )
        definition: WorkflowDef[P, R] = WorkflowDef(
            name=name or f.__name__, fn=cast(Callable[P, R], f), policy=policy
        )
        (registry or default_registry).add_workflow(definition)
        return definition

    return wrap(fn) if fn is not None else wrap


def load_app(module: str) -> Registry:
    """Import the app module `module` (which registers its tasks and workflows)."""
    try:
        imported = importlib.import_module(module)
    except KeyboardInterrupt:
        raise  # the person at the terminal, not the app
    except BaseException as exc:
        # The module itself not found is a wrong name or path; anything else,
        # SystemExit too, is the app's own failure: an app that exits while
        # imported cannot be served, and `coda run` must not end quietly.
        missing = (exc.name or "") if isinstance(exc, ModuleNotFoundError) else ""
        if missing and (module == missing or module.startswith(missing + ".")):
            raise UnknownNameError(
                f"cannot import app module {module!r}: {exc}. Run from the "
                "directory that contains it or put it on PYTHONPATH."
            ) from exc
        raise AppImportError(module, exc) from exc
    registry = getattr(imported, "registry", None)
    return registry if isinstance(registry, Registry) else default_registry
