"""Every error Coda raises.

One root, `CodaError`. A subclass that refines a builtin also inherits it, so
``except ValueError`` keeps working for a caller who does not know Coda. Each
message names the run, task or value concerned and says what to do about it.
"""

from __future__ import annotations

import traceback
from typing import Any

__all__ = [
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
]


class CodaError(Exception):
    """Root of every error Coda raises on purpose."""


class InternalError(CodaError, RuntimeError):
    """Coda reached a state it believes impossible: this is a bug, please report it."""


class ValueNotJSON(CodaError, TypeError):
    """An argument or result is not a JSON value; nothing was written."""


class ValueTooLarge(CodaError, ValueError):
    """An argument or result encodes to more bytes than the configured limit."""


class JournalError(CodaError, RuntimeError):
    """The journal cannot be read or written as asked."""


class JournalVersionError(JournalError):
    """The journal was written by a newer Coda; it is left untouched."""


class UnknownNameError(CodaError, LookupError):
    """A workflow or task name that the application does not register."""


class AppImportError(CodaError, ImportError):
    """The app module raised while being imported: a bug in the app, not in Coda.

    The message holds the app's traceback (the frames of Python's import
    machinery and of Coda that lead to the app's own left out, the exceptions
    it was raised from and the members of an exception group kept).
    """

    def __init__(self, module: str, exc: BaseException) -> None:
        report = traceback.TracebackException.from_exception(exc)
        frames = list(report.stack)
        # Everything down to the first frame of the app's own files is Coda
        # calling `importlib`, which the user needs to see no more than once.
        while frames and _is_import_machinery(frames[0].filename):
            frames.pop(0)
        report.stack = traceback.StackSummary.from_list(frames)
        trace = "".join(report.format()).rstrip("\n")
        super().__init__(
            f"app module {module!r} raised an exception while being imported; "
            f"fix the app, then start again:\n{trace}"
        )
        self.module = module


def _is_import_machinery(filename: str) -> bool:
    if filename.startswith("<frozen importlib"):
        return True
    path = filename.replace("\\", "/")
    return path.endswith(("/importlib/__init__.py", "/coda/definitions.py"))


class RunIdConflict(CodaError, ValueError):
    """A run id given again for a different workflow: ids name one run each."""


class RunNotFound(CodaError, LookupError):
    """No run matches the given id or id prefix."""


class ProtocolError(CodaError, ValueError):
    """A peer sent a frame or message that breaks the wire protocol."""


class NondeterminismError(CodaError, RuntimeError):
    """Workflow code did something other than what its history recorded.

    ``index`` is the step number within the attempt; ``recorded`` and ``produced``
    describe the step in the history and the step the code produced now.
    """

    def __init__(
        self, run_id: str, attempt: int, index: int, recorded: str, produced: str
    ) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self.index = index
        self.recorded = recorded
        self.produced = produced
        super().__init__(
            f"run {run_id} attempt {attempt} diverged from its history at step "
            f"{index}: history has {recorded}, the code now produced {produced}. "
            "Workflow code must be deterministic: keep the order of spawned tasks "
            "and use coda.context.now()/uuid4()/random() instead of the clock or "
            "the random module; deploy fixed code and resume the run."
        )


class TaskError(CodaError):
    """A task failed for good (after its retries); raised inside the workflow.

    The original exception lived in another process, so it arrives described:
    ``remote_type`` (its qualified class name), ``remote_message`` and
    ``remote_traceback``.
    """

    def __init__(
        self,
        task: str,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
        remote_types: tuple[str, ...] = (),
    ) -> None:
        self.task = task
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.remote_types = remote_types or (remote_type,)
        super().__init__(f"task {task} failed: {remote_type}: {remote_message}")

    def __reduce__(self) -> tuple[Any, ...]:
        args = (
            self.task,
            self.remote_type,
            self.remote_message,
            self.remote_traceback,
            self.remote_types,
        )
        return (type(self), args)


class TaskTimeout(CodaError, TimeoutError):
    """A task ran past its start-to-close timeout and its worker was replaced."""


class WorkerLost(CodaError, RuntimeError):
    """The worker running a task died before the task's result reached the journal."""


class Interrupted(CodaError, RuntimeError):
    """A task try was cut short by the supervisor stopping; it runs again, free."""


class RunFailedError(CodaError, RuntimeError):
    """A run the caller waited on ended failed; carries the recorded error."""

    def __init__(self, run_id: str, error_type: str, message: str, traceback: str):
        self.run_id = run_id
        self.error_type = error_type
        self.error_message = message
        self.traceback = traceback
        super().__init__(f"run {run_id} failed: {error_type}: {message}")


class RunParkedError(CodaError, RuntimeError):
    """A run the caller waited on was parked: its code diverged from its history."""

    def __init__(self, run_id: str, message: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"run {run_id} is parked: {message} (fix the workflow code, then resume "
            "the run)"
        )


class RunCancelled(CodaError, RuntimeError):
    """A run the caller waited on was cancelled."""
