"""The public surface, pinned: a change here is a change for every user."""

from __future__ import annotations

import importlib
import inspect

import pytest

import coda
import coda.context
import coda.errors
import coda.replay

PUBLIC = {
    "coda": [
        "Client",
        "CodaError",
        "LocalRunner",
        "NondeterminismError",
        "Registry",
        "RunCancelled",
        "RunFailedError",
        "RunIdConflict",
        "RunNotFound",
        "RunParkedError",
        "SyncClient",
        "TaskDef",
        "TaskError",
        "TaskTimeout",
        "UnknownNameError",
        "ValueNotJSON",
        "ValueTooLarge",
        "WorkerLost",
        "WorkflowDef",
        "context",
        "task",
        "workflow",
    ],
    "coda.context": [
        "attempt",
        "is_replaying",
        "logger",
        "now",
        "random",
        "run_id",
        "spawn_task",
        "uuid4",
    ],
    "coda.replay": ["ReplayOutcome", "load_history", "replay"],
    "coda.errors": [
        "AppImportError",
        "CodaError",
        "InternalError",
        "Interrupted",
        "JournalError",
        "JournalVersionError",
        "NondeterminismError",
        "ProtocolError",
        "RunCancelled",
        "RunFailedError",
        "RunIdConflict",
        "RunNotFound",
        "RunParkedError",
        "TaskError",
        "TaskTimeout",
        "UnknownNameError",
        "ValueNotJSON",
        "ValueTooLarge",
        "WorkerLost",
    ],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_exports_are_pinned(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == PUBLIC[module_name]
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name} is exported but missing"


def test_star_import_gives_exactly_the_exports() -> None:
    namespace: dict[str, object] = {}
    exec("from coda import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC["coda"]


def test_every_error_has_one_root_and_keeps_its_builtin() -> None:
    builtins_kept = {
        "ValueNotJSON": TypeError,
        "ValueTooLarge": ValueError,
        "UnknownNameError": LookupError,
        "RunNotFound": LookupError,
        "TaskTimeout": TimeoutError,
        "ProtocolError": ValueError,
        "NondeterminismError": RuntimeError,
        "JournalError": RuntimeError,
        "InternalError": RuntimeError,
    }
    for name in PUBLIC["coda.errors"]:
        cls = getattr(coda.errors, name)
        assert issubclass(cls, coda.CodaError), name
        if name in builtins_kept:
            assert issubclass(cls, builtins_kept[name]), name
    # The top-level names are the same classes, not copies.
    for name in PUBLIC["coda"]:
        if name in PUBLIC["coda.errors"]:
            assert getattr(coda, name) is getattr(coda.errors, name)


def test_errors_survive_pickling() -> None:
    # Errors cross process boundaries (worker to supervisor to client).
    import pickle

    error = coda.TaskError("t", "KeyError", "'x'", "tb", ("KeyError", "LookupError"))
    again = pickle.loads(pickle.dumps(error))
    assert (again.task, again.remote_type, again.remote_message) == (
        "t",
        "KeyError",
        "'x'",
    )
    assert again.remote_traceback == "tb"
    assert again.remote_types == ("KeyError", "LookupError")


def test_decorators_keep_functions_callable() -> None:
    registry = coda.Registry()

    @coda.task(name="api.add", registry=registry)
    def add(a: int, b: int) -> int:
        return a + b

    @coda.workflow(name="api.flow", registry=registry)
    async def flow() -> None:
        return None

    assert isinstance(add, coda.TaskDef)
    assert add(1, 2) == 3
    assert isinstance(flow, coda.WorkflowDef)
    coro = flow()
    assert inspect.iscoroutine(coro)
    coro.close()
    assert registry.task("api.add") is add
    assert registry.workflow("api.flow") is flow


def test_a_name_cannot_be_taken_twice() -> None:
    registry = coda.Registry()

    @coda.task(name="api.same", registry=registry)
    def first() -> None: ...

    with pytest.raises(ValueError, match=r"task name 'api\.same' is already used"):

        @coda.task(name="api.same", registry=registry)
        def second() -> None: ...

    with pytest.raises(TypeError, match="must be an async def"):
        coda.workflow(name="api.sync", registry=registry)(lambda: None)
    with pytest.raises(ValueError, match="max_retries=-1: a whole number >= 0"):
        coda.task(name="api.neg", registry=registry, max_retries=-1)(first.fn)
    with pytest.raises(coda.UnknownNameError, match=r"no task named 'api\.none'"):
        registry.task("api.none")


def test_the_version_is_a_string() -> None:
    assert isinstance(coda.__version__, str)
