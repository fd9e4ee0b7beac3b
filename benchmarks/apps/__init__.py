"""The apps the benchmark runs: one per system, each doing the same work."""
