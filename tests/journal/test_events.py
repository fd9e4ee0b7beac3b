"""Tests for coda.journal.events: what a retry policy may hold."""

from __future__ import annotations

import inspect
import math
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coda.journal import codec
from coda.journal import events as ev

FLOAT_FIELDS = ("backoff", "backoff_factor", "max_backoff")
COUNT_FIELDS = ("max_retries", "max_lost_workers")

counts = st.integers(min_value=0, max_value=2**64 - 1)
numbers = st.floats(min_value=0, allow_infinity=False) | st.integers(0, 2**53)
policies = st.builds(
    ev.RetryPolicy,
    max_retries=counts,
    retry_on=st.lists(st.text(max_size=8), max_size=3).map(tuple),
    backoff=numbers,
    backoff_factor=numbers,
    max_backoff=numbers,
    max_lost_workers=counts,
)


def submitted(policy: ev.RetryPolicy) -> ev.RunSubmitted:
    return ev.RunSubmitted(
        run_id="r", seq=0, at=1.0, workflow="w", args={}, policy=policy
    )


@given(policies)
def test_a_policy_of_finite_numbers_is_journaled_and_read_back_as_it_is(
    policy: ev.RetryPolicy,
) -> None:
    decoded = codec.decode(codec.encode(submitted(policy)))
    assert isinstance(decoded, ev.RunSubmitted)
    assert decoded.policy == policy


@given(policies, st.integers(min_value=1, max_value=10**6))
def test_every_retry_of_a_policy_waits_a_finite_time_within_its_cap(
    policy: ev.RetryPolicy, retry_number: int
) -> None:
    # A float power past the largest float raises rather than giving infinity:
    # the 1,025th retry of a doubling policy once raised OverflowError.
    assert 0 <= policy.delay(retry_number) <= policy.max_backoff


def test_a_late_retry_of_a_doubling_policy_waits_the_cap() -> None:
    assert ev.RetryPolicy(max_retries=5000).delay(5000) == 60.0
    assert ev.RetryPolicy(max_retries=5000, backoff=0).delay(5000) == 0.0


@given(
    st.sampled_from(FLOAT_FIELDS),
    st.sampled_from([math.inf, -math.inf, math.nan])
    | st.floats(max_value=-1e-300)
    | st.integers(max_value=-1),
)
def test_a_number_json_cannot_hold_or_below_zero_is_refused(
    field: str, value: float
) -> None:
    with pytest.raises(ValueError, match=rf"^{field}=[^:]*: a finite number"):
        ev.RetryPolicy(**{field: value})


@pytest.mark.parametrize("field", COUNT_FIELDS)
@pytest.mark.parametrize("value", [-1, 2**64, 1.0, True, "3", None])
def test_a_count_is_a_whole_number_from_zero(field: str, value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=rf"^{field}=.*a whole number"):
        ev.RetryPolicy(**{field: value})


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [False, "1.5", None, [1.0]])
def test_a_number_of_seconds_or_a_factor_is_an_int_or_a_float(
    field: str, value: Any
) -> None:
    with pytest.raises(TypeError, match=rf"^{field}=.*, not a"):
        ev.RetryPolicy(**{field: value})


@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_an_int_given_for_a_float_is_one_a_float_holds_exactly(field: str) -> None:
    # Read back as a float, 2**53 + 1 would become 2**53.
    assert getattr(ev.RetryPolicy(**{field: 2**53}), field) == 2**53
    with pytest.raises(ValueError, match=rf"^{field}=.*up to 2\*\*53 as an int"):
        ev.RetryPolicy(**{field: 2**53 + 1})


def test_the_message_says_what_to_write_instead_of_an_infinite_cap() -> None:
    with pytest.raises(ValueError) as refused:
        ev.RetryPolicy(3, ("Exception",), 1.0, 2.0, math.inf)
    assert str(refused.value) == (
        "max_backoff=inf: a finite number of seconds >= 0; for no cap, use a large "
        "number"
    )


def test_retry_on_is_a_tuple_of_names() -> None:
    with pytest.raises(TypeError, match=r"retry_on=.*a tuple of qualified class"):
        ev.RetryPolicy(retry_on=["OSError"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retry_on="):
        ev.RetryPolicy(retry_on=(OSError,))  # type: ignore[arg-type]


def test_a_stored_policy_is_read_as_it_is() -> None:
    # Reading is not declaring: a policy journaled before these checks (a
    # negative backoff) is read as it was stored, slot by slot, unchecked,
    # rather than making its run, or the journal, unreadable.
    obj = codec.encode_dict(submitted(ev.RetryPolicy()))
    obj["policy"] = {**obj["policy"], "backoff": -1.0, "max_retries": 3}
    decoded = codec.decode_dict(obj)
    assert isinstance(decoded, ev.RunSubmitted)
    assert (decoded.policy.backoff, decoded.policy.max_retries) == (-1.0, 3)
    assert codec._plain(ev.RetryPolicy)


def test_the_checked_parameters_are_the_fields_in_order() -> None:
    # `RetryPolicy.__new__` takes what `__init__` takes; a field added to one
    # and not the other would make every policy fail to be made.
    parameters = list(inspect.signature(ev.RetryPolicy.__new__).parameters)[1:]
    assert parameters == [f.name for f in attrs.fields(ev.RetryPolicy)]
    assert ev.RetryPolicy(1, ("E",), 0.5, 3.0, 9.0, 4) == ev.RetryPolicy(
        max_retries=1,
        retry_on=("E",),
        backoff=0.5,
        backoff_factor=3.0,
        max_backoff=9.0,
        max_lost_workers=4,
    )
