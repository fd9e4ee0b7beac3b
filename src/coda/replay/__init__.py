"""Replay: the engine that drives workflow code, and helpers for tests."""

from coda.replay.testing import ReplayOutcome, load_history, replay

__all__ = ["ReplayOutcome", "load_history", "replay"]
