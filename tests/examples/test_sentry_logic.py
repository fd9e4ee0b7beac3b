"""The pure steps of the Sentry example, checked against the bundled payloads.

The expected groups and symbolication verdicts come from the data's README
(`examples/sentry_app/data/README.md` and the shared copy it cites), not from
running the code.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from sentry_app import (
    BUNDLED_DATA,
    event_title,
    fingerprint,
    grouping_key,
    load_events,
    needs_symbolication,
    normalize,
    parse_timestamp,
    symbolicate,
)

SHARED_DATA = Path("/work/shared/data/sentry-events")
SDK_LINES = load_events(BUNDLED_DATA / "python-sdk.jsonl")
SAMPLES = {platform: event for event, platform in load_events(BUNDLED_DATA / "samples")}
ALL_EVENTS = load_events(BUNDLED_DATA)

# The partition of python-sdk.jsonl's 40 lines into groups. The multi-line
# entries are the README's "same group" ranges, plus the two TimeoutErrors of
# lines 19 and 21 (same exception, same thread function); the rest are alone.
EXPECTED_GROUPS = [
    [0, 1, 2],
    [3, 4, 5, 6],
    [7],
    [8, 9],
    [10],
    [11, 12, 13],
    [14, 15, 16],
    [17, 18],
    [19, 21],
    [20],
    [22, 23],
    [24],
    [25],
    [26, 27],
    [28, 29],
    [30, 31],
    [32],
    [33, 34],
    [35, 36],
    [37, 38],
    [39],
]
NEEDS_SYMBOLICATION = {
    "android-ndk",
    "exception-with-address-instruction",
    "nintendo-switch",
    "cordova",
}


def sdk_event(line: int) -> dict[str, Any]:
    return copy.deepcopy(SDK_LINES[line][0])


def sample(name: str) -> dict[str, Any]:
    return copy.deepcopy(SAMPLES[name])


def is_plain_json(value: Any) -> bool:
    """Only exact JSON types: no tuples, no subclasses, str keys, finite floats."""
    if value is None or type(value) in (str, bool, int):
        return True
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is list:
        return all(is_plain_json(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and is_plain_json(v) for k, v in value.items())
    return False


def all_frames(event: dict[str, Any]) -> list[dict[str, Any]]:
    frames = []
    for value in (event.get("exception") or {}).get("values", []):
        frames.extend((value.get("stacktrace") or {}).get("frames", []))
    for thread in (event.get("threads") or {}).get("values", []):
        frames.extend((thread.get("stacktrace") or {}).get("frames", []))
    return frames


# -- data ----------------------------------------------------------------------


def test_bundle_holds_all_49_events_with_file_stems_as_default_platforms():
    assert len(SDK_LINES) == 40
    assert all(platform is None for _, platform in SDK_LINES)
    assert sorted(SAMPLES) == sorted(
        [
            "android-ndk",
            "cordova",
            "exception-with-address-instruction",
            "java",
            "javascript",
            "nintendo-switch",
            "php",
            "python",
            "unity",
        ]
    )
    # A directory is read recursively in sorted order: the .jsonl sorts first.
    assert len(ALL_EVENTS) == 49
    assert [p for _, p in ALL_EVENTS[:40]] == [None] * 40
    assert [p for _, p in ALL_EVENTS[40:]] == sorted(SAMPLES)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not mounted")
def test_bundled_files_are_unchanged_copies_of_the_shared_data():
    originals = [
        SHARED_DATA / "python-sdk.jsonl",
        *sorted(SHARED_DATA.glob("samples/*")),
    ]
    for original in originals:
        copied = BUNDLED_DATA / original.relative_to(SHARED_DATA)
        assert copied.read_bytes() == original.read_bytes(), copied


def test_load_events_rejects_non_objects_and_other_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_events(tmp_path / "bad.jsonl")
    (tmp_path / "notes.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected a \.json or \.jsonl"):
        load_events(tmp_path / "notes.txt")


# -- grouping ------------------------------------------------------------------


def test_python_sdk_lines_fall_into_the_21_documented_groups():
    by_group: dict[str, list[int]] = defaultdict(list)
    for line, (event, platform) in enumerate(SDK_LINES):
        by_group[fingerprint(normalize(event, platform))].append(line)
    assert len(by_group) == 21
    assert sorted(by_group.values()) == EXPECTED_GROUPS


def test_grouping_reads_raw_and_normalized_events_alike():
    for event, platform in ALL_EVENTS:
        assert grouping_key(event) == grouping_key(normalize(event, platform))


def test_group_ids_are_pinned():
    # Stored group ids depend on this hash; changing the scheme splits every
    # existing group in two. Update these only on purpose.
    assert fingerprint(sdk_event(0)) == "76d6a3d0878d7c0c6f767dc682555c79"
    assert fingerprint(sdk_event(37)) == "3526d7f1e07d27a26eb66a86fc35fe59"


def test_grouping_kinds_follow_the_precedence():
    kinds = [grouping_key(event)[0] for event, _ in SDK_LINES]
    assert kinds[37:39] == ["fingerprint", "fingerprint"]
    assert kinds[22:28] == ["message"] * 6
    # Lines 28-29 are logged with a message *and* an exception: the exception wins.
    assert kinds[28:30] == ["exception", "exception"]
    assert grouping_key(sample("python"))[0] == "stacktrace"


def test_explicit_fingerprint_is_the_key():
    assert grouping_key(sdk_event(37)) == ("fingerprint", ["vat-rate-missing", "CH"])
    # Line 39 raises the same KeyError from the same function but has no fingerprint.
    assert fingerprint(sdk_event(39)) != fingerprint(sdk_event(37))


def test_default_placeholder_in_a_fingerprint_refines_the_default_key():
    event = sdk_event(0)
    default_kind, default = grouping_key(event)
    event["fingerprint"] = ["{{ default }}", "eu"]
    assert grouping_key(event) == (
        "fingerprint",
        [f"default:{default_kind}", *default, "eu"],
    )
    other_region = {**event, "fingerprint": ["{{ default }}", "us"]}
    assert fingerprint(event) != fingerprint(other_region)


def test_exception_key_is_types_plus_in_app_functions():
    assert grouping_key(sdk_event(8)) == (
        "exception",
        [
            "type:KeyError",
            "function:get_setting",
            "type:ConfigError",
            "function:load_payment_settings",
            "function:get_setting",
        ],
    )
    # Line 30 has 10 frames, 8 of them in http.client and socket (in_app unset).
    assert grouping_key(sdk_event(30))[1] == [
        "type:ConnectionRefusedError",
        "function:charge_order",
        "function:charge",
    ]


def test_exception_values_and_library_frames_do_not_split_a_group():
    event = sdk_event(30)
    frames = event["exception"]["values"][0]["stacktrace"]["frames"]
    library_frame = next(f for f in frames if f.get("in_app") is not True)
    changed = copy.deepcopy(event)
    changed["exception"]["values"][0]["value"] = "[Errno 113] No route to host"
    changed_frames = changed["exception"]["values"][0]["stacktrace"]["frames"]
    changed_frames[frames.index(library_frame)]["function"] = "connect_ex"
    assert fingerprint(changed) == fingerprint(event)

    in_app_frame = next(f for f in changed_frames if f.get("in_app") is True)
    in_app_frame["function"] = "refund_order"
    assert fingerprint(changed) != fingerprint(event)


def test_without_in_app_frames_every_function_counts():
    # php.json marks no frame in-app: all four functions count.
    assert grouping_key(sample("php")) == (
        "exception",
        [
            "type:Exception",
            "function:null",
            "function:main",
            "function:cmd_test",
            "function:raven_cli_test",
        ],
    )
    # java.json marks 3 of its 57 frames in-app: only those count.
    java = grouping_key(sample("java"))[1]
    assert java == [
        "type:ApiException",
        "function:home",
        "function:fetch",
        "function:perform",
    ]
    assert len(all_frames(normalize(sample("java")))) == 57


def test_recursion_depth_does_not_split_a_group():
    def recursing(depth: int) -> dict[str, Any]:
        frames = [{"function": "main", "in_app": True}]
        frames += [{"function": "walk", "in_app": True}] * depth
        exception = {"type": "RecursionError", "stacktrace": {"frames": frames}}
        return {"exception": {"values": [exception]}}

    assert fingerprint(recursing(150)) == fingerprint(recursing(199))
    assert grouping_key(recursing(3))[1] == [
        "type:RecursionError",
        "function:main",
        "function:walk",
    ]


def test_message_key_is_the_unformatted_template():
    assert grouping_key(sdk_event(26)) == (
        "message",
        ["refund for order %s rejected by provider: %s"],
    )
    assert fingerprint(sdk_event(26)) == fingerprint(sdk_event(27))
    # Two capture_message calls with different text, no template: two groups.
    assert fingerprint(sdk_event(24)) != fingerprint(sdk_event(25))


def test_event_without_grouping_data_falls_back_to_one_shared_group():
    assert grouping_key({"level": "info"}) == ("fallback", [])
    assert fingerprint({"platform": "go"}) == fingerprint({"level": "info"})


def test_titles():
    assert event_title(sdk_event(0)) == "ZeroDivisionError: division by zero"
    # The chained exception: the outermost (last) one names the problem.
    assert event_title(sdk_event(8)) == "ConfigError: missing setting payments.api_key"
    assert event_title(normalize(sdk_event(26))) == (
        "refund for order 5020 rejected by provider: card_expired"
    )
    assert event_title(sdk_event(22)) == "Payment provider latency above threshold"
    assert event_title(sample("python")) == "<unlabeled event>"
    assert event_title(sample("java")) == (
        "ApiException: Authentication failed, token expired!"
    )
    # Type and value are the same text in this sample: said once.
    assert event_title(sample("exception-with-address-instruction")) == (
        "The operation couldn\u2019t be completed. "
        "(ServiceKit.ClientTask.Result.ResultError error 1.)"
    )
    long_message = {"message": "first line " + "x" * 300 + "\nsecond line"}
    title = event_title(long_message)
    assert len(title) == 200 and title.endswith("…") and "\n" not in title


# -- needs_symbolication -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_needs_symbolication_on_samples(name):
    expected = name in NEEDS_SYMBOLICATION
    assert needs_symbolication(sample(name), name) is expected
    assert needs_symbolication(normalize(sample(name), name)) is expected


def test_no_python_sdk_line_needs_symbolication():
    assert [needs_symbolication(e, p) for e, p in SDK_LINES] == [False] * 40
    assert not any(needs_symbolication(normalize(e, p)) for e, p in SDK_LINES)


def test_a_frame_platform_overrides_the_event_platform():
    # cordova.json has no platform at all; its frames say "javascript".
    assert needs_symbolication(sample("cordova")) is True
    event = sample("cordova")
    for frame in all_frames(event):
        frame["platform"] = "python"
    assert needs_symbolication(event, "cordova") is False


def test_minified_js_needs_a_column_and_a_minified_path():
    def js(path: str, colno: int | None) -> dict[str, Any]:
        frame = {"abs_path": path, "lineno": 1, "colno": colno}
        exception = {"type": "Error", "stacktrace": {"frames": [frame]}}
        return {"platform": "javascript", "exception": {"values": [exception]}}

    assert needs_symbolication(js("https://x/app.min.js", 120)) is True
    assert needs_symbolication(js("app:///main.jsbundle", 7)) is True
    assert needs_symbolication(js("https://x/app.min.js", None)) is False
    assert needs_symbolication(js("https://x/app.js", 120)) is False


def test_a_symbolicated_event_needs_nothing_more():
    event = normalize(sample("android-ndk"), "android-ndk")
    assert needs_symbolication(symbolicate(event)) is False


# -- normalize -----------------------------------------------------------------


def test_legacy_interface_keys_are_renamed():
    java = normalize(sample("java"), "java")
    assert not [key for key in java if key.startswith("sentry.interfaces.")]
    assert java["exception"]["values"][0]["type"] == "ApiException"
    assert java["request"]["url"] == "http://localhost:8080/"
    assert java["user"]["email"] == "user@sentry.io"
    assert java["logentry"] == {
        "message": "Authentication failed, token expired!",
        "formatted": "Authentication failed, token expired!",
    }
    assert java["message"] == "Authentication failed, token expired!"
    assert java["breadcrumbs"] == sample("java")["sentry.interfaces.Breadcrumbs"]

    python = normalize(sample("python"), "python")
    assert python["platform"] == "python"
    assert [f["function"] for f in python["stacktrace"]["frames"]][:2] == [
        "build_msg",
        "capture",
    ]
    assert python["template"]["lineno"] == 14
    assert normalize(sample("php"), "php")["exception"]["values"][0]["type"] == (
        "Exception"
    )


def test_canonical_key_wins_over_its_legacy_spelling():
    event = {
        "user": {"id": "new"},
        "sentry.interfaces.User": {"id": "old"},
        "sentry.interfaces.Message": {"message": "legacy"},
    }
    normalized = normalize(event)
    assert normalized["user"] == {"id": "new"}
    assert "sentry.interfaces.User" not in normalized
    assert normalized["message"] == "legacy"


def test_platform_comes_from_the_event_then_the_default_then_other():
    assert normalize(sample("unity"), "unity")["platform"] == "csharp"
    assert normalize(sample("cordova"), "cordova")["platform"] == "cordova"
    assert normalize(sample("cordova"))["platform"] == "other"


def test_tags_become_sorted_string_pairs_from_a_list_or_a_dict():
    switch = normalize(sample("nintendo-switch"), "nintendo-switch")
    assert switch["tags"] == [
        ["environment", "integration-test"],
        ["level", "error"],
        ["mechanism", "2168-0002"],
        ["os", "Nintendo OS 20.1.5"],
        ["os.name", "Nintendo OS"],
    ]
    unity = normalize(sample("unity"), "unity")
    assert unity["tags"] == [
        ["deviceUniqueIdentifier", "C52DC39D-DAF3-5E36-A8D3-BF5F53A5D38F"]
    ]
    as_dict = normalize({"tags": {"b": "2", "a": 1, "c": None}})
    as_list = normalize({"tags": [["a", 1], ["b", "2"], ["c", None]]})
    assert as_dict["tags"] == as_list["tags"] == [["a", "1"], ["b", "2"]]
    assert normalize({})["tags"] == []


def test_sdk_tags_dict_is_sorted_and_keeps_non_ascii_values():
    assert normalize(sdk_event(12))["tags"] == [
        ["customer.tier", "standard"],
        ["route", "/admin/price-lists/upload"],
        ["upload", "preise_größen.csv"],
    ]


def test_breadcrumbs_are_always_wrapped_in_values():
    unity_raw = sample("unity")
    assert isinstance(unity_raw["breadcrumbs"], list)
    crumbs = normalize(unity_raw, "unity")["breadcrumbs"]
    assert list(crumbs) == ["values"]
    assert [c["message"] for c in crumbs["values"]] == [
        c["message"] for c in unity_raw["breadcrumbs"]
    ]
    # Their ISO timestamps (no offset: UTC) become epoch seconds too.
    assert (
        crumbs["values"][0]["timestamp"]
        == dt.datetime(2018, 10, 25, 13, 3, 2, tzinfo=dt.UTC).timestamp()
    )
    assert normalize({})["breadcrumbs"] == {"values": []}
    wrapped = normalize(sample("nintendo-switch"))["breadcrumbs"]["values"]
    assert len(wrapped) == len(sample("nintendo-switch")["breadcrumbs"]["values"])


@pytest.mark.parametrize(
    "value",
    [
        "2018-10-25T13:03:02Z",
        "2018-10-25T13:03:02+00:00",
        "2018-10-25T15:03:02+02:00",
        "2018-10-25T13:03:02",
        "2018-10-25 13:03:02",
        1540472582,
        1540472582.0,
        "1540472582",
        dt.datetime(2018, 10, 25, 13, 3, 2, tzinfo=dt.UTC),
    ],
)
def test_timestamps_become_epoch_floats(value):
    normalized = normalize({"timestamp": value})
    assert normalized["timestamp"] == 1540472582.0
    assert type(normalized["timestamp"]) is float


def test_naive_timestamps_are_utc_whatever_the_local_zone(monkeypatch):
    # A POSIX TZ string needs no zone database: five hours west of UTC.
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        assert normalize({"timestamp": "2018-10-25T13:03:02"})["timestamp"] == (
            1540472582.0
        )
    finally:
        monkeypatch.undo()
        time.tzset()


def test_sdk_timestamp_keeps_its_microseconds():
    normalized = normalize(sdk_event(0))
    expected = dt.datetime(2026, 12, 4, 15, 13, 59, 183125, tzinfo=dt.UTC)
    assert normalized["timestamp"] == expected.timestamp()


def test_missing_or_unreadable_timestamp_is_left_out():
    assert "timestamp" not in normalize({})
    bad = normalize({"timestamp": "yesterday"})
    assert "timestamp" not in bad
    assert {"type": "invalid_data", "name": "timestamp", "value": "yesterday"} in (
        bad["errors"]
    )
    assert parse_timestamp(True) is None
    assert parse_timestamp(float("nan")) is None


def test_event_id_is_normalized_to_32_lowercase_hex():
    android = normalize(sample("android-ndk"), "android-ndk")
    assert android["event_id"] == "3882f0cd6fcf4b16b9417ce61f8bfb13"
    upper = normalize({"event_id": "3882F0CD-6FCF-4B16-B941-7CE61F8BFB13"})
    assert upper["event_id"] == "3882f0cd6fcf4b16b9417ce61f8bfb13"
    assert normalize(sdk_event(0))["event_id"] == "d3c86af3f2c149fe936cb79814d71a64"


def test_missing_event_id_is_derived_from_the_content():
    first = normalize(sample("java"), "java")
    again = normalize(sample("java"), "java")
    assert first["event_id"] == again["event_id"]
    assert len(first["event_id"]) == 32 and int(first["event_id"], 16) >= 0
    # A different event, or the same payload under another platform, differs.
    assert normalize(sample("php"), "php")["event_id"] != first["event_id"]
    assert normalize(sample("java"), "kotlin")["event_id"] == first["event_id"]
    assert (
        normalize(sample("python"), "python")["event_id"]
        != normalize(sample("python"), "other")["event_id"]
    )
    # Spelling does not matter: legacy keys, list tags vs the canonical forms.
    canonical = sample("java")
    for legacy in [k for k in canonical if k.startswith("sentry.interfaces.")]:
        key = {"Http": "request", "Message": "logentry"}.get(
            legacy.rsplit(".", 1)[1], legacy.rsplit(".", 1)[1].lower()
        )
        canonical[key] = canonical.pop(legacy)
    canonical["tags"] = dict(canonical["tags"])
    assert normalize(canonical, "java")["event_id"] == first["event_id"]


def test_derived_event_id_is_the_same_in_another_process():
    # Replay may happen in a fresh worker with another string-hash seed.
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(BUNDLED_DATA.parents[1])!r})\n"
        "from sentry_app import normalize, load_events, BUNDLED_DATA\n"
        "print(json.dumps([normalize(e, p)['event_id']"
        " for e, p in load_events(BUNDLED_DATA / 'samples')]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    here = [
        normalize(e, p)["event_id"] for e, p in load_events(BUNDLED_DATA / "samples")
    ]
    assert json.loads(out) == here


def test_level_defaults_to_error_and_is_canonical():
    assert normalize({})["level"] == "error"
    assert normalize(sample("android-ndk"))["level"] == "fatal"
    assert normalize({"level": "WARN"})["level"] == "warning"
    assert normalize({"level": 20})["level"] == "info"
    odd = normalize({"level": "loud"})
    assert odd["level"] == "error"
    assert odd["errors"] == [{"type": "invalid_data", "name": "level", "value": "loud"}]
    assert normalize(sdk_event(22))["level"] == "warning"


def test_logentry_message_is_formatted_with_its_params():
    raw = sdk_event(26)
    assert normalize(raw)["message"] == (
        "refund for order 5020 rejected by provider: card_expired"
    )
    del raw["logentry"]["formatted"]  # formatted here instead of by the SDK
    normalized = normalize(raw)
    assert normalized["message"] == (
        "refund for order 5020 rejected by provider: card_expired"
    )
    assert normalized["logentry"]["message"] == (
        "refund for order %s rejected by provider: %s"
    )
    named = normalize({"logentry": {"message": "%(n)d left", "params": {"n": 3}}})
    assert named["message"] == "3 left"
    # Params that do not fit, and widths that would blow up memory, are not used.
    assert (
        normalize({"logentry": {"message": "%d", "params": ["x"]}})["message"] == "%d"
    )
    wide = normalize({"logentry": {"message": "%999999999s", "params": ["x"]}})
    assert wide["message"] == "%999999999s"


def test_plain_message_becomes_a_logentry():
    normalized = normalize(sdk_event(22))
    assert normalized["logentry"] == {
        "formatted": "Payment provider latency above threshold"
    }
    assert normalized["message"] == "Payment provider latency above threshold"
    assert normalize({"logentry": "plain text"})["logentry"] == {
        "formatted": "plain text"
    }


def test_explicit_fingerprint_is_kept_and_otherwise_absent():
    assert normalize(sdk_event(37))["fingerprint"] == ["vat-rate-missing", "CH"]
    assert "fingerprint" not in normalize(sdk_event(0))
    assert normalize({"fingerprint": ["a", 2]})["fingerprint"] == ["a", "2"]


def test_exceptions_sent_without_the_values_wrapper():
    lone = {"exception": {"type": "E", "value": "boom"}}
    listed = {"exception": [{"type": "E", "value": "boom"}]}
    expected = {"values": [{"type": "E", "value": "boom"}]}
    assert normalize(lone)["exception"] == normalize(listed)["exception"] == expected


def test_every_normalized_event_is_plain_json():
    for event, platform in ALL_EVENTS:
        normalized = normalize(event, platform)
        assert is_plain_json(normalized)
        assert json.loads(json.dumps(normalized)) == normalized


def test_non_json_input_is_converted():
    moment = dt.datetime(2018, 10, 25, 13, 3, 2, tzinfo=dt.UTC)
    event = {
        "timestamp": moment,
        "extra": {
            "when": moment,
            "pair": (1, 2),
            "ids": {"b", "a"},
            1: "int key",
            "nan": float("nan"),
            "raw": b"caf\xc3\xa9",
        },
    }
    normalized = normalize(event)
    assert is_plain_json(normalized)
    assert normalized["timestamp"] == 1540472582.0
    assert normalized["extra"] == {
        "when": "2018-10-25T13:03:02+00:00",
        "pair": [1, 2],
        "ids": ["a", "b"],
        "1": "int key",
        "nan": None,
        "raw": "café",
    }


def test_normalize_returns_a_new_dict_and_leaves_its_input_alone():
    raw = sample("unity")
    before = copy.deepcopy(raw)
    normalized = normalize(raw, "unity")
    assert raw == before
    normalized["contexts"]["gpu"]["name"] = "changed"
    normalized["exception"]["values"][0]["type"] = "changed"
    assert raw == before


def test_normalize_is_idempotent():
    for event, platform in ALL_EVENTS:
        once = normalize(event, platform)
        assert normalize(once) == once
        assert normalize(once, "something-else") == once


# -- symbolicate ---------------------------------------------------------------


def test_android_ndk_frames_resolve_against_libart():
    event = normalize(sample("android-ndk"), "android-ndk")
    result = symbolicate(event)
    frames = all_frames(result)
    assert len(frames) == 36
    assert result["symbolicated"] is True
    assert result["symbolicated_frames"] == 34

    libart = "/apex/com.android.runtime/lib/libart.so"
    # image_addr 0xe5d95000, image_size 6975488 (0x6a7000): ends at 0xe643c000.
    assert frames[1] == {
        "instruction_addr": "0xe625e154",
        "package": libart,
        "image_offset": "0x4c9154",
        "function": "<libart.so+0x4c9154>",
        "symbolicated": True,
        "symbolicator_status": "symbolicated",
    }
    outside = [f["instruction_addr"] for f in frames if not f.get("symbolicated")]
    assert outside == ["0x708ebbf9", "0xbcc196b4"]
    assert all(
        f["symbolicator_status"] == "missing_image" and "package" not in f
        for f in frames
        if not f.get("symbolicated")
    )


def test_image_bounds_and_existing_function_names():
    def native(addr: str, **frame: Any) -> dict[str, Any]:
        image = {
            "image_addr": "0x1000",
            "image_size": "0x100",
            "code_file": "C:\\a\\b.dll",
        }
        exception = {"stacktrace": {"frames": [{"instruction_addr": addr, **frame}]}}
        return {
            "platform": "native",
            "exception": {"values": [exception]},
            "debug_meta": {"images": [image]},
        }

    def only_frame(event: dict[str, Any]) -> dict[str, Any]:
        return symbolicate(event)["exception"]["values"][0]["stacktrace"]["frames"][0]

    first = only_frame(native("0x1000"))
    assert (first["image_offset"], first["function"]) == ("0x0", "<b.dll+0x0>")
    assert only_frame(native("0x10ff"))["image_offset"] == "0xff"
    assert only_frame(native("0x1100"))["symbolicator_status"] == "missing_image"
    assert only_frame(native("0x1010", function="main"))["function"] == "main"
    assert only_frame(native("junk"))["symbolicator_status"] == "invalid_address"


def test_frames_without_a_matching_image_are_marked():
    result = symbolicate(normalize(sample("exception-with-address-instruction")))
    assert result["symbolicated_frames"] == 0
    frames = all_frames(result)
    assert [f["symbolicator_status"] for f in frames] == ["missing_image"] * 4
    # Names the SDK already sent are kept.
    assert frames[3]["package"] == "UIKitCore"
    switch = symbolicate(normalize(sample("nintendo-switch"), "nintendo-switch"))
    assert [f["symbolicator_status"] for f in all_frames(switch)] == [
        "missing_image"
    ] * 3
    assert all_frames(switch)[0]["function"] == "nnMain"


def test_minified_js_frames_are_marked_and_keep_their_positions():
    result = symbolicate(normalize(sample("cordova"), "cordova"))
    minified, plain = all_frames(result)
    assert minified["symbolicator_status"] == "missing_sourcemap"
    assert (minified["lineno"], minified["colno"], minified["function"]) == (
        2,
        39434,
        "o",
    )
    assert plain == all_frames(sample("cordova"))[1]
    assert result["symbolicated_frames"] == 0


def test_symbolicate_is_idempotent_pure_and_json_only():
    for name in sorted(SAMPLES):
        event = normalize(sample(name), name)
        before = copy.deepcopy(event)
        once = symbolicate(event)
        assert event == before
        assert symbolicate(once) == once
        assert is_plain_json(once)
        assert normalize(once) == once


def test_symbolication_leaves_other_frames_untouched():
    for name in ("java", "javascript", "php", "unity"):
        event = normalize(sample(name), name)
        result = symbolicate(event)
        assert all_frames(result) == all_frames(event)
        assert {
            k: v for k, v in result.items() if not k.startswith("symbolicated")
        } == (event)
