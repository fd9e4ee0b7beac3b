"""An exception's description is bounded before it is stored or sent."""

from __future__ import annotations

from coda.journal.events import ErrorInfo


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
