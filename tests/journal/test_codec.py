"""Tests for coda.journal.codec: the stored JSON form of events."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coda.errors import JournalError, JournalVersionError
from coda.journal import codec
from coda.journal import events as ev
from coda.journal.codec import FORMAT_VERSION, decode, decode_dict, encode, encode_dict

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
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
ints = st.integers(min_value=0, max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(max_size=12)

error_infos = st.builds(
    ev.ErrorInfo,
    type=texts,
    message=texts,
    traceback=texts,
    types=st.lists(texts, max_size=3).map(tuple),
)
# A policy refuses negative numbers when it is made (`RetryPolicy`); reading one
# stored anyway is `test_a_stored_policy_is_read_as_it_is` in test_events.py.
policies = st.builds(
    ev.RetryPolicy,
    max_retries=ints,
    retry_on=st.lists(texts, max_size=3).map(tuple),
    backoff=st.floats(min_value=0, allow_infinity=False),
    backoff_factor=st.floats(min_value=0, allow_infinity=False),
    max_backoff=st.floats(min_value=0, allow_infinity=False),
    max_lost_workers=ints,
)

# Every field of every event, by name. A field added to an event without a
# strategy here fails `test_every_field_has_a_strategy`.
FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "run_id": texts,
    "seq": ints,
    "at": floats,
    "attempt": ints,
    "step": ints,
    "try_number": ints,
    "from_attempt": ints,
    "workflow": texts,
    "task": texts,
    "kind": texts,
    "worker": texts,
    "reason": texts,
    "args": st.dictionaries(texts, json_values, max_size=3),
    "result": json_values,
    "value": json_values,
    "cache_key": st.none() | st.lists(json_values, max_size=3),
    "policy": policies,
    "timeout": st.none() | floats,
    "retry_at": st.none() | floats,
    "error": error_infos,
}


def events_of(cls: type[ev.Event]) -> st.SearchStrategy[ev.Event]:
    fields = {f.name: FIELD_STRATEGIES[f.name] for f in attrs.fields(cls)}
    if cls is ev.TaskReused:
        fields["cache_key"] = st.lists(json_values, max_size=3)
    return st.builds(cls, **fields)


any_event = st.sampled_from(sorted(ev.EVENT_TYPES.values(), key=str)).flatmap(events_of)


def test_every_field_has_a_strategy() -> None:
    for cls in ev.EVENT_TYPES.values():
        for field in attrs.fields(cls):
            assert field.name in FIELD_STRATEGIES, f"{cls.__name__}.{field.name}"


@settings(max_examples=300, deadline=None)
@given(any_event)
def test_every_event_type_round_trips(event: ev.Event) -> None:
    data = encode(event)
    assert decode(data) == event
    assert decode(data.decode()) == event  # str input too
    obj = orjson.loads(data)
    assert obj["v"] == FORMAT_VERSION
    assert obj["type"] == type(event).__name__
    assert decode_dict(encode_dict(event)) == event


@settings(max_examples=100, deadline=None)
@given(any_event)
def test_the_type_name_in_the_form_is_the_class_name(event: ev.Event) -> None:
    assert ev.EVENT_TYPES[type(event).__name__] is type(event)


# Versions, unknown types, old and new objects.


def cancelled(**changes: Any) -> dict[str, Any]:
    obj = {"v": 1, "type": "RunCancelled", "run_id": "r1", "seq": 5, "at": 10.0}
    obj.update(changes)
    return obj


def test_a_newer_version_is_refused() -> None:
    with pytest.raises(JournalVersionError, match="v2 is newer than this Coda"):
        decode_dict(cancelled(v=FORMAT_VERSION + 1))


@pytest.mark.parametrize("version", [None, "1", 1.0, True, 0, -1])
def test_a_missing_or_bogus_version_is_refused(version: object) -> None:
    obj = cancelled(v=version)
    if version is None:
        del obj["v"]
    with pytest.raises(JournalError, match="not a Coda event"):
        decode_dict(obj)


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(JournalVersionError, match="unknown event type 'RunExploded'"):
        decode_dict(cancelled(type="RunExploded"))
    # Base classes are not events of their own.
    for name in ("Event", "StepEvent", "ErrorInfo"):
        with pytest.raises(JournalVersionError):
            decode_dict(cancelled(type=name))


@settings(max_examples=200, deadline=None)
@given(any_event, st.data())
def test_an_old_object_without_a_later_field_decodes_with_its_default(
    event: ev.Event, data: st.DataObject
) -> None:
    # A field added in a later version has a default; an object written before
    # it existed lacks the key and must load with the default.
    defaulted = [f for f in attrs.fields(type(event)) if f.default is not attrs.NOTHING]
    if not defaulted:
        return
    field = data.draw(st.sampled_from(defaulted))
    obj = encode_dict(event)
    del obj[field.name]
    decoded = decode_dict(obj)
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    assert decoded == attrs.evolve(event, **{field.name: default})


def test_an_old_object_without_nested_defaults_decodes() -> None:
    obj = {
        "v": 1,
        "type": "TaskFailed",
        "run_id": "r1",
        "seq": 4,
        "at": 1,
        "attempt": 1,
        "step": 0,
        "try_number": 1,
        "error": {"type": "OSError", "message": "boom"},
    }
    decoded = decode_dict(obj)
    assert decoded == ev.TaskFailed(
        run_id="r1",
        seq=4,
        at=1.0,
        attempt=1,
        step=0,
        try_number=1,
        error=ev.ErrorInfo("OSError", "boom", "", ()),
        retry_at=None,
    )
    assert isinstance(decoded.at, float)


@settings(max_examples=100, deadline=None)
@given(any_event, st.dictionaries(st.text(min_size=1), json_values, max_size=3))
def test_unknown_keys_are_ignored(event: ev.Event, extra: dict[str, Any]) -> None:
    obj = encode_dict(event)
    for key, value in extra.items():
        obj.setdefault("new_" + key, value)
    assert decode_dict(obj) == event


def test_a_missing_required_field_is_a_malformed_event() -> None:
    obj = cancelled()
    del obj["seq"]
    with pytest.raises(JournalError, match=r"malformed RunCancelled event .*\$\.seq"):
        decode_dict(obj)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"seq": "5"}, "seq"),
        ({"seq": 5.5}, "seq"),
        ({"seq": True}, "seq"),
        ({"run_id": 5}, "run_id"),
        ({"at": "now"}, "at"),
        ({"at": False}, "at"),
        ({"reason": ["x"]}, "reason"),
    ],
)
def test_fields_of_the_wrong_type_are_refused_not_converted(
    changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(JournalError, match=rf"\$\.{field}"):
        decode_dict(cancelled(**changes))


def test_containers_of_the_wrong_type_are_refused_not_converted() -> None:
    scheduled = encode_dict(
        ev.TaskScheduled(
            run_id="r", seq=2, at=1.0, attempt=1, step=0, task="t", args={}
        )
    )
    # A string cache key must not become the list of its letters, which would
    # change which cached result a later attempt finds.
    for field, value in [
        ("cache_key", "abc"),
        ("cache_key", {"a": 1}),
        ("args", [["a", 1]]),
        ("args", "a"),
    ]:
        with pytest.raises(JournalError, match=rf"\$\.{field}"):
            decode_dict({**scheduled, field: value})
    failed = encode_dict(
        ev.TaskFailed(
            run_id="r",
            seq=3,
            at=1.0,
            attempt=1,
            step=0,
            try_number=1,
            error=ev.ErrorInfo("E", "m", "", ("E",)),
        )
    )
    with pytest.raises(JournalError, match=r"\$\.error\.types"):
        decode_dict({**failed, "error": {"type": "E", "message": "m", "types": "E"}})


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("policy", [1], r"\$\.policy"),
        ("policy", None, r"\$\.policy"),
        ("policy", {"max_retries": True}, r"\$\.policy\.max_retries"),
        ("policy", {"backoff": "1"}, r"\$\.policy\.backoff"),
        ("policy", {"retry_on": ["OSError", 1]}, r"\$\.policy\.retry_on\[1\]"),
        ("timeout", True, r"\$\.timeout"),
        ("args", {"a": 1, 2: 3}, r"\$\.args"),
    ],
)
def test_nested_objects_are_read_as_strictly(field: str, value: Any, path: str) -> None:
    scheduled = encode_dict(
        ev.TaskScheduled(
            run_id="r", seq=2, at=1.0, attempt=1, step=0, task="t", args={}
        )
    )
    with pytest.raises(JournalError, match=path):
        decode_dict({**scheduled, field: value})


def test_a_missing_required_nested_field_is_named() -> None:
    failed = encode_dict(
        ev.RunFailed(run_id="r", seq=3, at=1.0, error=ev.ErrorInfo("E", "m"))
    )
    with pytest.raises(
        JournalError, match=r"required field missing @ \$\.error\.message"
    ):
        decode_dict({**failed, "error": {"type": "E"}})
    with pytest.raises(JournalError, match=r"\$\.error"):
        decode_dict({**failed, "error": "E: m"})


def test_equal_policies_and_errors_are_shared_when_decoding() -> None:
    policy = ev.RetryPolicy(max_retries=3, retry_on=("OSError",), backoff=0.5)
    error = ev.ErrorInfo("OSError", "gone", "tb", ("OSError", "Exception"))
    events = [
        encode(
            ev.TaskScheduled(
                run_id="r",
                seq=i,
                at=1.0,
                attempt=1,
                step=i,
                task="t",
                args={},
                policy=policy,
            )
        )
        for i in range(3)
    ] + [encode(ev.RunFailed(run_id="r", seq=i, at=1.0, error=error)) for i in (3, 4)]
    decoded = [decode(data) for data in events]
    policies = {id(e.policy) for e in decoded if isinstance(e, ev.TaskScheduled)}
    errors = {id(e.error) for e in decoded if isinstance(e, ev.RunFailed)}
    assert len(policies) == 1 and len(errors) == 1
    assert [e.policy for e in decoded[:3]] == [policy] * 3  # type: ignore[attr-defined]


def test_a_shared_policy_keeps_the_sign_of_zero() -> None:
    # -0.0 == 0.0: a policy with one must not be answered with the other.
    obj = encode_dict(ev.RunSubmitted(run_id="r", seq=0, at=1.0, workflow="w", args={}))
    for zero in (0.0, -0.0, 0.0, -0.0):
        decoded = decode_dict({**obj, "policy": {"backoff": zero}})
        assert isinstance(decoded, ev.RunSubmitted)
        assert str(decoded.policy.backoff) == str(zero)


@pytest.mark.parametrize("value", [b"x", {1, 2}, {1: "a"}, object()])
def test_values_json_cannot_hold_are_refused_not_converted(value: object) -> None:
    # `coda.values` refuses them where they are made; should one get this far
    # it is not stored as something else (bytes as base85, a set as a list).
    event = ev.RunCompleted(run_id="r", seq=5, at=1.0, attempt=1, result=value)
    with pytest.raises(TypeError):
        encode(event)


def test_only_event_types_are_encoded() -> None:
    with pytest.raises(TypeError, match="not an event type"):
        encode_dict(ev.Event(run_id="r", seq=0, at=1.0))


def test_an_integer_too_large_for_a_float_is_a_malformed_event() -> None:
    with pytest.raises(JournalError, match=r"\$\.at"):
        decode_dict(cancelled(at=10**400))


def test_only_classes_whose_init_just_sets_fields_are_filled_slot_by_slot() -> None:
    @attrs.frozen
    class Checked:
        x: int = attrs.field(validator=attrs.validators.gt(0))

    @attrs.frozen
    class Plain:
        x: int

    assert not codec._plain(Checked)
    assert codec._plain(Plain)
    assert all(codec._plain(cls) for cls in ev.EVENT_TYPES.values())


def test_an_integer_time_is_read_as_a_float() -> None:
    decoded = decode_dict(cancelled(at=10))
    assert decoded.at == 10.0
    assert type(decoded.at) is float


@pytest.mark.parametrize(
    "data", [b"", b"{", b"[1, 2]", b'"event"', b"null", b"\xff", "{'v': 1}"]
)
def test_garbage_is_a_journal_error(data: bytes | str) -> None:
    with pytest.raises(JournalError):
        decode(data)


# The documented form, pinned: an accidental change of field names, order or
# nesting must fail here, because journals and `coda history --json` output
# written by earlier versions have to stay readable.

_POLICY = (
    '{"max_retries":0,"retry_on":["Exception"],"backoff":1.0,"backoff_factor":2.0,'
    '"max_backoff":60.0,"max_lost_workers":2}'
)
_ERROR = (
    '{"type":"ConnectionRefusedError","message":"no","traceback":"tb",'
    '"types":["ConnectionRefusedError","ConnectionError","OSError","Exception",'
    '"BaseException"]}'
)
_HEAD = '{"v":1,"type":"%s","run_id":"r1","seq":%d,"at":1733300000.5'
PINNED: list[tuple[ev.Event, str]] = [
    (
        ev.RunSubmitted(
            run_id="r1", seq=0, at=1733300000.5, workflow="wf", args={"x": [1, None]}
        ),
        _HEAD % ("RunSubmitted", 0)
        + f',"workflow":"wf","args":{{"x":[1,null]}},"policy":{_POLICY}}}',
    ),
    (
        ev.AttemptStarted(run_id="r1", seq=1, at=1733300000.5, attempt=1),
        _HEAD % ("AttemptStarted", 1) + ',"attempt":1}',
    ),
    (
        ev.TaskScheduled(
            run_id="r1",
            seq=2,
            at=1733300000.5,
            attempt=1,
            step=0,
            task="t",
            args={"a": 1},
            cache_key=["k", 1],
        ),
        _HEAD % ("TaskScheduled", 2)
        + ',"attempt":1,"step":0,"task":"t","args":{"a":1},"cache_key":["k",1],'
        + f'"policy":{_POLICY},"timeout":null}}',
    ),
    (
        ev.TaskStarted(
            run_id="r1", seq=3, at=1733300000.5, attempt=1, step=0, try_number=1
        ),
        _HEAD % ("TaskStarted", 3)
        + ',"attempt":1,"step":0,"try_number":1,"worker":""}',
    ),
    (
        ev.TaskFailed(
            run_id="r1",
            seq=4,
            at=1733300000.5,
            attempt=1,
            step=0,
            try_number=1,
            error=ev.ErrorInfo.from_exception(ConnectionRefusedError("no"), "tb"),
            retry_at=1733300002.25,
        ),
        _HEAD % ("TaskFailed", 4)
        + f',"attempt":1,"step":0,"try_number":1,"error":{_ERROR},'
        + '"retry_at":1733300002.25}',
    ),
    (
        ev.TaskCompleted(
            run_id="r1",
            seq=7,
            at=1733300000.5,
            attempt=1,
            step=2,
            try_number=1,
            result={"a": [1, 2.5, None]},
            cache_key=["k", 1],
        ),
        _HEAD % ("TaskCompleted", 7)
        + ',"attempt":1,"step":2,"try_number":1,"result":{"a":[1,2.5,null]},'
        + '"cache_key":["k",1]}',
    ),
    (
        ev.TaskReused(
            run_id="r1",
            seq=8,
            at=1733300000.5,
            attempt=2,
            step=0,
            task="t",
            cache_key=["k"],
            result="x",
            from_attempt=1,
        ),
        _HEAD % ("TaskReused", 8)
        + ',"attempt":2,"step":0,"task":"t","cache_key":["k"],"result":"x",'
        + '"from_attempt":1}',
    ),
    (
        ev.SideEffectRecorded(
            run_id="r1",
            seq=9,
            at=1733300000.5,
            attempt=1,
            step=1,
            kind="now",
            value=5.5,
        ),
        _HEAD % ("SideEffectRecorded", 9)
        + ',"attempt":1,"step":1,"kind":"now","value":5.5}',
    ),
    (
        ev.AttemptFailed(
            run_id="r1",
            seq=10,
            at=1733300000.5,
            attempt=1,
            error=ev.ErrorInfo("ValueError", "bad", "", ("ValueError",)),
        ),
        _HEAD % ("AttemptFailed", 10)
        + ',"attempt":1,"error":{"type":"ValueError","message":"bad","traceback":"",'
        + '"types":["ValueError"]},"retry_at":null}',
    ),
    (
        ev.RunCompleted(run_id="r1", seq=11, at=1733300000.5, attempt=2, result=None),
        _HEAD % ("RunCompleted", 11) + ',"attempt":2,"result":null}',
    ),
    (
        ev.RunFailed(
            run_id="r1", seq=12, at=1733300000.5, error=ev.ErrorInfo("E", "m")
        ),
        _HEAD % ("RunFailed", 12)
        + ',"error":{"type":"E","message":"m","traceback":"","types":[]}}',
    ),
    (
        ev.RunCancelled(run_id="r1", seq=13, at=1733300000.5, reason="by hand"),
        _HEAD % ("RunCancelled", 13) + ',"reason":"by hand"}',
    ),
    (
        ev.RunParked(
            run_id="r1",
            seq=14,
            at=1733300000.5,
            attempt=1,
            error=ev.ErrorInfo("E", "m"),
        ),
        _HEAD % ("RunParked", 14)
        + ',"attempt":1,"error":{"type":"E","message":"m","traceback":"","types":[]}}',
    ),
    (
        ev.RunResumed(run_id="r1", seq=15, at=1733300000.5),
        _HEAD % ("RunResumed", 15) + ',"reason":""}',
    ),
    (
        ev.RunRetried(run_id="r1", seq=16, at=1733300000.5, reason="again"),
        _HEAD % ("RunRetried", 16) + ',"reason":"again"}',
    ),
]


def test_the_pinned_examples_cover_every_event_type() -> None:
    assert {type(event) for event, _ in PINNED} == set(ev.EVENT_TYPES.values())


@pytest.mark.parametrize(
    ("event", "text"), PINNED, ids=[type(e).__name__ for e, _ in PINNED]
)
def test_the_json_form_is_stable(event: ev.Event, text: str) -> None:
    assert encode(event).decode() == text
    assert decode(text) == event


def test_the_example_in_the_codec_docstring_reads() -> None:
    text = (
        '{"v": 1, "type": "TaskCompleted", "run_id": "r", "seq": 7, '
        '"at": 1733300000.5, "attempt": 1, "step": 2, "try_number": 1, '
        '"result": {"ok": true}}'
    )
    assert decode(text) == ev.TaskCompleted(
        run_id="r",
        seq=7,
        at=1733300000.5,
        attempt=1,
        step=2,
        try_number=1,
        result={"ok": True},
    )
