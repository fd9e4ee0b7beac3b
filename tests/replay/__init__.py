"""Tests for coda.replay: the deterministic loop, the engine, replay properties."""
