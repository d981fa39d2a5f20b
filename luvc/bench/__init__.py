"""Benchmarks: each measures schedules against ``identity`` in the same run."""
