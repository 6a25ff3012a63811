"""Benchmarks that print tables (kernels, end to end); never imported by the runtime."""
