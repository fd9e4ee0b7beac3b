"""The multi-process runtime: supervisor, workers, clients."""
