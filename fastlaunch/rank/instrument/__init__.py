"""Per-rank instrumentation (memory, syncs, timing) and the report the launcher builds from it."""
