"""Benchmarks for kugetsu: latency, overhead and memory, measured against local fakes."""
