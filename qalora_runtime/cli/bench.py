"""`qalora bench kernels|crossover|bitwidths [options]`: kernel benchmarks (qalora_runtime/bench/)."""

from __future__ import annotations

import argparse

BENCHES = ("kernels", "crossover", "bitwidths")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `bench` subcommand; everything after the bench name goes to that bench."""
    p = subparsers.add_parser(
        "bench",
        help="benchmarks: `qalora bench kernels|crossover|bitwidths --help`",
        description="Run a benchmark; options after its name are the benchmark's own.",
    )
    p.add_argument("which", choices=BENCHES, help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of that benchmark")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Dispatch to the benchmark's own ``main``."""
    from ..bench import bitwidths, crossover, kernels

    bench = {"kernels": kernels, "crossover": crossover, "bitwidths": bitwidths}[args.which]
    return int(bench.main(args.bench_args) or 0)
