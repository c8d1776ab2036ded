"""Benchmarks: fastlaunch side by side with what users would run instead, in one interleaved run."""
