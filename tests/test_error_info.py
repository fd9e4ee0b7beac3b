"""An exception's description is bounded before it is stored or sent."""

from __future__ import annotations

import os

from coda.journal.codec import decode, encode
from coda.journal.events import ErrorInfo, TaskFailed


def test_a_huge_message_keeps_its_start_and_says_what_was_cut() -> None:
    message = "start " + "m" * 1_000_000
    info = ErrorInfo.from_exception(ValueError(message))
    assert len(info.message) < ErrorInfo.MAX_MESSAGE_CHARS + 200
    assert info.message.startswith("start mmm")
    cut = len(message) - ErrorInfo.MAX_MESSAGE_CHARS
    assert f"{cut:,} characters cut" in info.message
    assert info.type == "ValueError"


def test_a_huge_traceback_keeps_both_ends() -> None:
    traceback = "Traceback (most recent call last):\n" + "  frame\n" * 200_000
    traceback += "ValueError: the end\n"
    info = ErrorInfo.from_exception(ValueError("x"), traceback)
    assert len(info.traceback) < ErrorInfo.MAX_TRACEBACK_CHARS + 200
    assert info.traceback.startswith("Traceback (most recent call last):")
    assert info.traceback.endswith("ValueError: the end\n")
    assert "characters cut" in info.traceback


def test_descriptions_within_the_bounds_are_kept_whole() -> None:
    message = "m" * ErrorInfo.MAX_MESSAGE_CHARS
    traceback = "t" * ErrorInfo.MAX_TRACEBACK_CHARS
    info = ErrorInfo.from_exception(ValueError(message), traceback)
    assert info.message == message
    assert info.traceback == traceback


def test_lone_surrogates_are_escaped_so_the_error_can_be_written() -> None:
    # A file name that is not UTF-8, as os.listdir gives it; other text stays.
    name = os.fsdecode(b"caf\xe9.txt")
    error = ErrorInfo.from_exception(
        FileNotFoundError(f"no file {name} (été)"), f"Traceback: {name}"
    )
    assert error.message == "no file caf\\udce9.txt (été)"
    assert error.traceback == "Traceback: caf\\udce9.txt"
    event = TaskFailed(
        run_id="r", seq=4, at=1.0, attempt=1, step=0, try_number=1, error=error
    )
    assert decode(encode(event)) == event
