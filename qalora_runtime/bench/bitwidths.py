"""``qalora bench bitwidths``: do fewer bits decode faster? cpu_fused at 2/3/4 bits, calls interleaved.

On a shared VM, identical runs move by +-20%, more than the differences between
bit widths on a compute-bound path. This bench therefore calls the 2-, 3- and
4-bit layers, a dense fp32 ``x @ W`` and, for fp32 activations, the 2/3-bit
layers in the quad layout the plane layout replaced, round-robin in one loop,
so every variant sees the same machine state, and reports median and
20th-percentile microseconds per call with their ratios to 4-bit (for the dense
row that ratio is the 4-bit kernel's speed-up). Each variant cycles through its
own pool of layers larger than L3, as in ``qalora bench kernels``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from ..kernels import cpu_fused
from ..kernels.cpu_fused_pack import repack
from ..quant.spec import QuantSpec
from .common import (
    DTYPES,
    add_layer_options,
    apply_layer_options,
    check_layer_options,
    positive_int,
    random_layer,
    weight_pool,
)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qalora bench bitwidths", description=__doc__.splitlines()[0])
    add_layer_options(p, "576x1536,1536x576,4096x4096", "fp32,bf16", 1)
    p.add_argument("--m", type=positive_int, default=1, help="rows of x (decode: 1)")
    p.add_argument("--seconds", type=float, default=6.0, help="interleaved timing per shape and dtype")
    args = p.parse_args(argv)
    check_layer_options(p, args)
    if not cpu_fused.extension_available():
        p.error("the cpu_fused extension is not available on this machine (no compiler?)")
    return args


def _variants(k: int, n: int, group: int, dtype: torch.dtype, pool_mib: float) -> dict[str, tuple]:
    """label -> (spec, pool): the model's layers at 2/3/4 bits, dense fp32, and for fp32 the quad layout."""
    kernel = cpu_fused.CpuFusedKernel()
    out = {}
    for bits in (2, 3, 4):
        spec = QuantSpec(bits, group)
        out[f"{bits}-bit"] = (spec, weight_pool(kernel.prepare(*random_layer(k, n, spec), spec, dtype, torch.device("cpu")),
                                          pool_mib))
        if cpu_fused.uses_plane_layout(spec, dtype):
            qw, ss = repack(*random_layer(k, n, spec), spec)
            quad = {"qw": qw, "ss": ss, "out_features": torch.empty(n, 0, dtype=torch.uint8)}
            out[f"{bits}-bit quad"] = (spec, weight_pool(quad, pool_mib))
    out["dense fp32"] = (None, weight_pool({"w": torch.randn(k, n)}, pool_mib))  # the reference, at any dtype
    return out


def interleaved_times(variants: dict[str, tuple], x: torch.Tensor, seconds: float) -> dict[str, list[float]]:
    """Per-call seconds of every variant, called round-robin for ``seconds``."""
    kernel = cpu_fused.CpuFusedKernel()
    x32 = x.float()
    times: dict[str, list[float]] = {label: [] for label in variants}
    end, i = time.perf_counter() + seconds, 0
    while time.perf_counter() < end or i < 3:
        for label, (spec, pool) in variants.items():
            w = pool[i % len(pool)]
            t0 = time.perf_counter()
            if spec is None:
                torch.matmul(x32, w["w"])
            else:
                kernel.forward(x, w, spec)
            times[label].append(time.perf_counter() - t0)
        i += 1
    return times


def main(argv: Sequence[str] | None = None) -> int:
    """Print, per shape and dtype, interleaved timings of 2/3/4-bit and their ratios to 4-bit."""
    args = _parse_args(argv)
    apply_layer_options(args)
    out = sys.stdout
    out.write(f"torch {torch.__version__}, {torch.get_num_threads()} threads, group {args.group}, M={args.m}\n")
    for k, n in args.shapes:
        for dname in args.dtype:
            variants = _variants(k, n, args.group, DTYPES[dname], args.pool_mib)
            times = interleaved_times(variants, torch.randn(args.m, k).to(DTYPES[dname]), args.seconds)
            med = {label: statistics.median(t) for label, t in times.items()}
            p20 = {label: sorted(t)[len(t) // 5] for label, t in times.items()}
            out.write(f"\nK={k} N={n} {dname} ({len(times['4-bit'])} interleaved rounds)\n")
            out.write(f"  {'variant':<12} {'median us':>10} {'p20 us':>10} {'median/4-bit':>13} {'p20/4-bit':>10}\n")
            for label in variants:
                out.write(f"  {label:<12} {med[label] * 1e6:10.1f} {p20[label] * 1e6:10.1f} "
                          f"{med[label] / med['4-bit']:13.2f} {p20[label] / p20['4-bit']:10.2f}\n")
            out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
