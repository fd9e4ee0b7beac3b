"""The wire form of commands and error descriptions: round trips, strict reading."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coda.errors import ProtocolError
from coda.journal.events import ErrorInfo, RetryPolicy
from coda.replay.engine import (
    Command,
    CompleteRun,
    FailAttempt,
    RecordSideEffect,
    ReuseResult,
    ScheduleTask,
)
from coda.runtime.wire import decode_command, decode_error, encode_command, encode_error

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=8,
)
names = st.text(max_size=8)
numbers = st.integers(0, 10**6)
errors = st.builds(
    ErrorInfo, names, names, names, st.lists(names, max_size=3).map(tuple)
)
policies = st.builds(
    RetryPolicy,
    numbers,
    st.lists(names, max_size=3).map(tuple),
    st.floats(0, 10),
    st.floats(1, 3),
    st.floats(0, 100),
    numbers,
)
commands = st.one_of(
    st.builds(
        ScheduleTask,
        numbers,
        numbers,
        names,
        st.dictionaries(st.text(), json_values, max_size=3),
        st.none() | st.lists(json_values, max_size=3),
        policies,
        st.none() | st.floats(0, 100),
    ),
    st.builds(
        ReuseResult,
        numbers,
        numbers,
        names,
        st.lists(json_values, max_size=3),
        json_values,
        numbers,
    ),
    st.builds(RecordSideEffect, numbers, numbers, names, json_values),
    st.builds(CompleteRun, numbers, json_values),
    st.builds(FailAttempt, numbers, errors),
)


def _over_the_wire(obj: dict[str, Any]) -> Any:
    return orjson.loads(orjson.dumps(obj))


@given(commands)
def test_commands_survive_the_wire(command: Command) -> None:
    decoded = decode_command(_over_the_wire(encode_command(command)))
    assert decoded == command
    assert type(decoded) is type(command)


@given(errors)
def test_errors_survive_the_wire(error: ErrorInfo) -> None:
    assert decode_error(_over_the_wire(encode_error(error))) == error


def test_the_written_form() -> None:
    error = ErrorInfo("ValueError", "bad", "tb", ("ValueError", "Exception"))
    assert encode_command(FailAttempt(2, error)) == {
        "attempt": 2,
        "error": {
            "type": "ValueError",
            "message": "bad",
            "traceback": "tb",
            "types": ["ValueError", "Exception"],
        },
        "type": "FailAttempt",
    }
    body = encode_command(ScheduleTask(1, 0, "t", {}, None, RetryPolicy(), 5.0))
    assert body["type"] == "ScheduleTask"
    assert body["policy"]["retry_on"] == ["Exception"]


GOOD = {"type": "CompleteRun", "attempt": 1, "result": None}
SCHEDULE = _over_the_wire(
    encode_command(ScheduleTask(1, 0, "t", {"a": 1}, ["k"], RetryPolicy(), None))
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({**GOOD, "attempt": "1"}, "expected int, found '1' @ $.attempt"),
        ({**GOOD, "attempt": 1.5}, "expected int, found 1.5 @ $.attempt"),
        ({**GOOD, "attempt": True}, "expected int, found True @ $.attempt"),
        ({"type": "CompleteRun", "attempt": 1}, "required field missing @ $.result"),
        ({**SCHEDULE, "cache_key": "ab"}, "expected a list or null, found 'ab'"),
        ({**SCHEDULE, "args": [1]}, "expected an object, found [1] @ $.args"),
        (
            {**SCHEDULE, "policy": {**SCHEDULE["policy"], "retry_on": "Exception"}},
            "expected a list of str, found 'Exception' @ $.policy.retry_on",
        ),
        (
            {"type": "FailAttempt", "attempt": 1, "error": {"type": "X"}},
            "required field missing @ $.error.message",
        ),
    ],
)
def test_malformed_commands_are_refused_not_converted(
    body: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProtocolError, match="malformed") as caught:
        decode_command(body)
    assert message in str(caught.value)


@pytest.mark.parametrize("body", ["x", None, {"type": "Nope"}, {"op": "x"}])
def test_what_is_not_a_command_is_refused(body: Any) -> None:
    with pytest.raises(ProtocolError, match="not a command"):
        decode_command(body)


def test_an_integer_is_read_where_a_float_is_expected_and_extra_keys_ignored() -> None:
    decoded = decode_command({**SCHEDULE, "timeout": 10, "extra": 1})
    assert isinstance(decoded, ScheduleTask)
    assert decoded.timeout == 10.0 and type(decoded.timeout) is float


def test_error_descriptions_are_read_strictly_with_defaults() -> None:
    assert decode_error({"type": "X", "message": "m"}) == ErrorInfo("X", "m")
    for body, message in [
        (None, "expected an object, found None @ $"),
        ({"type": 1, "message": "m"}, "expected str, found 1 @ $.type"),
        ({"type": "X", "message": "m", "types": "ab"}, "found 'ab' @ $.types"),
    ]:
        with pytest.raises(ProtocolError, match="malformed error description") as e:
            decode_error(body)
        assert message in str(e.value)
