"""Coda: a durable workflow engine."""
