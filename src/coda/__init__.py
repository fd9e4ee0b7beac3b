"""Coda: a durable workflow engine for Python.

Declare tasks with `@coda.task`, workflows with `@coda.workflow`, spawn tasks
from workflow code with `coda.context.spawn_task`, and run them with `coda run`
(see the README) or, in one process, with `coda.LocalRunner`.
"""

from coda import context
from coda.definitions import Registry, TaskDef, WorkflowDef, task, workflow
from coda.driver import LocalRunner
from coda.errors import (
    CodaError,
    NondeterminismError,
    RunCancelled,
    RunFailedError,
    RunIdConflict,
    RunNotFound,
    RunParkedError,
    TaskError,
    TaskTimeout,
    UnknownNameError,
    ValueNotJSON,
    ValueTooLarge,
    WorkerLost,
)
from coda.runtime.client import Client, SyncClient

__all__ = [
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
]

__version__ = "0.1.0"
