"""Tests for coda.values: only JSON reaches the journal, refused with its path."""

from __future__ import annotations

import collections
import datetime
import enum
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coda.errors import ValueNotJSON, ValueTooLarge
from coda.journal.codec import decode, encode
from coda.journal.events import TaskScheduled
from coda.values import (
    DEFAULT_MAX_VALUE_BYTES,
    MAX_DEPTH,
    _find_fault,
    _plain,
    check_json,
    check_size,
    check_value,
    dumps,
    loads,
)


class Colour(enum.IntEnum):
    RED = 1


class Mode(enum.StrEnum):
    FAST = "fast"


def refused(value: object, where: str = "v") -> str:
    with pytest.raises(ValueNotJSON) as info:
        check_json(value, where)
    return str(info.value)


def nested(depth: int) -> list[Any]:
    """`depth` lists inside each other, around 1."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def same(a: object, b: object) -> bool:
    """Equal, and of exactly the same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        assert isinstance(b, float)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=25,
)

# Things that look like JSON to a careless eye, mixed into JSON values.
lookalikes = (
    st.integers()  # unbounded: some are outside 64 bits
    | st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            (1, 2),
            {1, 2},
            frozenset(),
            b"x",
            bytearray(b"x"),
            Colour.RED,
            Mode.FAST,
            collections.OrderedDict(a=1),
            datetime.date(2024, 1, 1),
            object(),
            "\ud800",
            "ok\udcff",
        ]
    )
)
almost_json = st.recursive(
    json_scalars | lookalikes,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=6)
            | st.integers(0, 3)
            | st.just("\udc80")
            | st.just(Mode.FAST),
            inner,
            max_size=4,
        )
    ),
    max_leaves=25,
)


# What is accepted.


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_json_values_are_accepted_and_round_trip(value: Any) -> None:
    check_json(value, "v")
    assert same(loads(dumps(value)), value)


@settings(max_examples=300, deadline=None)
@given(almost_json)
def test_whatever_is_accepted_survives_the_journal_unchanged(value: Any) -> None:
    # The promise behind refusing: a value that passes the check is stored and
    # read back exactly, inside a real event, with the same types.
    try:
        check_json(value, "v")
    except ValueNotJSON:
        return
    event = TaskScheduled(
        run_id="r", seq=3, at=1.0, attempt=1, step=0, task="t", args={"x": value}
    )
    decoded = decode(encode(event))
    assert isinstance(decoded, TaskScheduled)
    assert same(decoded.args["x"], value)


def _walk_accepts(value: object) -> bool:
    try:
        _find_fault(value, "v")
    except ValueNotJSON:
        return False
    return True


@settings(max_examples=500, deadline=None)
@given(almost_json)
def test_the_fast_path_accepts_exactly_what_the_full_walk_accepts(
    value: Any,
) -> None:
    # `check_json` lets a value through on `_plain` alone: were it laxer than
    # the walk that names faults, a bad value would reach the journal; were
    # it stricter, a good one would be walked for nothing (and passed).
    assert _plain(value, 0) == _walk_accepts(value)
    assert _plain({"k": [value]}, 0) == _walk_accepts({"k": [value]})


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
@pytest.mark.parametrize("bad", [None, math.nan, (1,)])
def test_the_fast_path_and_the_walk_agree_at_the_depth_limit(
    depth: int, bad: object
) -> None:
    value: Any = nested(depth)
    if bad is not None:
        inner = value
        while isinstance(inner, list) and isinstance(inner[0], list):
            inner = inner[0]
        inner[0] = bad
    assert _plain(value, 0) == _walk_accepts(value)
    assert _plain({"x": value}, 0) == _walk_accepts({"x": value})


def test_edges_of_the_accepted_range() -> None:
    for value in (2**63, 2**64 - 1, -(2**63), 0.0, -0.0, 1e308, "", "é☃", {"": []}):
        check_json(value, "v")
        event = TaskScheduled(
            run_id="r", seq=3, at=1.0, attempt=1, step=0, task="t", args={"x": value}
        )
        decoded = decode(encode(event))
        assert isinstance(decoded, TaskScheduled)
        assert same(decoded.args["x"], value)


# What is refused, and how the refusal reads.


def test_datetime_is_refused_with_argument_and_path() -> None:
    args = {"event_data": {"received": datetime.datetime(2024, 1, 1)}}
    message = refused(args, "args of task t")
    assert message.startswith(
        'args of task t["event_data"]["received"]: datetime is not a JSON value'
    )
    assert "isoformat" in message


def test_paths_go_through_lists_and_dicts() -> None:
    message = refused({"a": [1, {"b c": [None, b"x"]}]}, "result of task t")
    assert message.startswith('result of task t["a"][1]["b c"][1]: bytes ')


def test_the_first_bad_part_in_document_order_is_named() -> None:
    assert refused([1, {2}, b"x"]).startswith("v[1]: set ")
    assert refused({"a": 1, "b": (1,), "c": b"x"}).startswith('v["b"]: tuple ')


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ((1, 2), "v: tuple is not a JSON value (use a list)"),
        ({1, 2}, "v: set is not a JSON value (use a sorted list)"),
        (frozenset(), "v: frozenset is not a JSON value (use a sorted list)"),
        (b"x", "v: bytes is not a JSON value (decode it or base64-encode it)"),
        (bytearray(b"x"), "v: bytearray is not a JSON value"),
        (Colour.RED, "v: Colour is not a JSON value (a subclass of int"),
        (Mode.FAST, "v: Mode is not a JSON value (a subclass of str"),
        (collections.OrderedDict(), "v: OrderedDict is not a JSON value"),
        (object(), "v: object is not a JSON value"),
    ],
)
def test_non_json_types_are_refused(value: object, expected: str) -> None:
    assert refused(value).startswith(expected)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(value: float) -> None:
    message = refused({"x": [value]})
    assert message.startswith('v["x"][0]: ')
    assert "NaN or infinity" in message


@pytest.mark.parametrize("key", [1, None, (1, 2), 1.5, True, Mode.FAST])
def test_non_str_keys_are_refused(key: object) -> None:
    message = refused({"outer": {key: 1}})
    assert message.startswith(f'v["outer"]: key {key!r} is a {type(key).__name__}')


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 10**100])
def test_integers_beyond_64_bits_are_refused(number: int) -> None:
    assert refused([number]).startswith(f"v[0]: integer {number} is outside")


def test_lone_surrogates_are_refused_in_values_and_keys() -> None:
    assert refused({"name": "file\udcff.txt"}).startswith('v["name"]: str ')
    message = refused({"ok": {"\ud800": 1}})
    assert message.startswith('v["ok"]: key ')
    message.encode("utf-8")  # the message itself can be printed


def test_deep_nesting_is_refused_without_recursion_error() -> None:
    check_json(nested(MAX_DEPTH), "v")
    message = refused(nested(MAX_DEPTH + 1))
    assert f"nested more than {MAX_DEPTH} levels deep" in message
    # Far past the interpreter's recursion limit: still a clean refusal.
    assert f"nested more than {MAX_DEPTH}" in refused(nested(100_000))
    deep_dict: Any = 1
    for _ in range(100_000):
        deep_dict = {"k": deep_dict}
    assert f"nested more than {MAX_DEPTH}" in refused(deep_dict)


def test_the_deepest_accepted_value_fits_in_an_event() -> None:
    value = nested(MAX_DEPTH)
    event = TaskScheduled(
        run_id="r", seq=3, at=1.0, attempt=1, step=0, task="t", args={"x": value}
    )
    decoded = decode(encode(event))
    assert isinstance(decoded, TaskScheduled)
    assert decoded.args["x"] == value


def test_a_long_flat_value_is_checked_quickly() -> None:
    check_json(list(range(200_000)), "v")
    check_json({str(i): i for i in range(100_000)}, "v")


# The size limit.


def test_size_limit_names_the_value_and_the_limit() -> None:
    check_size(b"x" * 10, "args of task t", limit=10)
    with pytest.raises(ValueTooLarge) as info:
        check_size(b"x" * 11, "args of task t", limit=10)
    assert str(info.value).startswith(
        "args of task t: 11 bytes encoded, over the limit of 10 bytes"
    )


def test_check_value_checks_type_then_size() -> None:
    assert check_value({"a": "xy"}, "v", limit=12) == b'{"a":"xy"}'
    with pytest.raises(ValueTooLarge, match="over the limit of 9 bytes"):
        check_value({"a": "xy"}, "v", limit=9)
    with pytest.raises(ValueNotJSON):
        check_value({"a": b"xy"}, "v", limit=1000)
    assert DEFAULT_MAX_VALUE_BYTES == 16 * 1024 * 1024


def test_errors_also_inherit_the_builtin_they_refine() -> None:
    with pytest.raises(TypeError):
        check_json(b"x", "v")
    with pytest.raises(ValueError):
        check_size(b"xx", "v", limit=1)
