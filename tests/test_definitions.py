"""Tests for coda.definitions: what `@coda.task` and `@coda.workflow` accept."""

from __future__ import annotations

import math
from typing import Any

import pytest

import coda


async def _flow() -> None:
    return None


def _job() -> None:
    return None


@pytest.mark.parametrize(
    ("parameter", "value", "allowed"),
    [
        ("max_backoff", math.inf, "a finite number of seconds >= 0; for no cap"),
        ("max_backoff", math.nan, "a finite number of seconds >= 0"),
        ("backoff", -0.5, "a finite number of seconds >= 0"),
        ("backoff_factor", math.inf, "a finite number >= 0"),
        ("max_retries", -1, "a whole number >= 0"),
        ("max_retries", 2.5, "a whole number >= 0, not a float"),
        ("max_retries", True, "a whole number >= 0, not a bool"),
    ],
)
def test_a_workflow_or_task_policy_the_journal_cannot_hold_is_refused_when_declared(
    parameter: str, value: Any, allowed: str
) -> None:
    registry = coda.Registry()
    with pytest.raises((TypeError, ValueError)) as refused:
        coda.workflow(registry=registry, **{parameter: value})(_flow)
    assert str(refused.value).startswith(f"workflow _flow: {parameter}={value!r}: ")
    assert allowed in str(refused.value)
    with pytest.raises((TypeError, ValueError)) as refused:
        coda.task(name="flaky", registry=registry, **{parameter: value})(_job)
    assert str(refused.value).startswith(f"task flaky: {parameter}={value!r}: ")
    assert not registry.tasks and not registry.workflows


def test_max_lost_workers_is_a_whole_number() -> None:
    with pytest.raises(ValueError, match=r"task _job: max_lost_workers=-2: a whole"):
        coda.task(registry=coda.Registry(), max_lost_workers=-2)(_job)


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "30"])
def test_a_task_timeout_is_a_finite_number_of_seconds_above_zero(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)) as refused:
        coda.task(registry=coda.Registry(), timeout=value)(_job)
    assert str(refused.value).startswith(f"task _job: timeout={value!r}: ")
    assert "a finite number of seconds > 0, or None" in str(refused.value)


@pytest.mark.parametrize("retry_on", [ValueError, [ValueError()], ["OSError"], 3])
def test_retry_on_is_a_list_of_exception_classes(retry_on: Any) -> None:
    with pytest.raises(TypeError, match=r"task _job: retry_on.*exception classes"):
        coda.task(registry=coda.Registry(), retry_on=retry_on)(_job)


def test_finite_numbers_are_declared_as_given() -> None:
    registry = coda.Registry()
    job = coda.task(
        registry=registry,
        retry_on=(OSError, KeyError),
        max_retries=10_000,
        backoff=0,
        max_backoff=1e9,
        timeout=0.5,
    )(_job)
    assert job.policy.retry_on == ("OSError", "KeyError")
    assert (job.policy.max_retries, job.policy.max_backoff) == (10_000, 1e9)
    assert job.timeout == 0.5
    assert registry.task("_job") is job
