"""``qalora bench crossover``: where the CPU fused kernel's large-M paths start to beat its GEMV.

``cpu_fused`` runs small M as a GEMV (``q8`` for bf16 activations, exact ``f32``
for fp32) and large M either as its own tiled dequantize-and-multiply GEMM
(``gemm``) or by dequantizing the layer into x's dtype and calling ATen's GEMM
(``dense``: for bf16 the AMX or AVX512-BF16 kernel where the CPU has one, else oneDNN/MKL;
for fp32 on such a CPU also ``bf16_gemm``, the opt-in bf16-product prefill);
``gemm_min_m()`` and ``large_m_mode()`` in ``kernels/cpu_fused.py`` are the switch. This bench times
them all on the same layers (a pool larger than L3, as in ``qalora bench
kernels``) for every M in ``--m`` and prints, per shape, bit width and dtype,
the smallest M from which each large-M path is faster than the GEMV at every
larger M measured, next to what the dispatcher uses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from ..kernels import cpu_fused
from ..quant.spec import QuantSpec
from .common import (
    DTYPES,
    add_layer_options,
    apply_layer_options,
    bit_width,
    check_layer_options,
    csv_list,
    positive_int,
    random_layer,
    time_pool,
    weight_pool,
)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qalora bench crossover", description=__doc__.splitlines()[0])
    add_layer_options(p, "576x1536,1536x576,4096x4096", "bf16,fp32", 0)
    p.add_argument("--m", type=csv_list(positive_int, "row counts"), default="1,2,3,4,6,8,12,16,24,32",
                   help="comma list of row counts M, ascending")
    p.add_argument("--bits", type=csv_list(bit_width, "bit widths"), default="4", help="comma list of bit widths")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per entry")
    args = p.parse_args(argv)
    if args.m != sorted(args.m):
        p.error("--m must be ascending")
    check_layer_options(p, args)
    if not cpu_fused.extension_available():
        p.error("the cpu_fused extension is not available on this machine (no compiler?)")
    return args


def crossover_m(gemv_s: Sequence[float], gemm_s: Sequence[float], ms: Sequence[int]) -> int | None:
    """Smallest M from which the large-M path is faster at every M measured after it (None: never)."""
    best: int | None = None
    for m, tv, tm in reversed(list(zip(ms, gemv_s, gemm_s))):
        if tm >= tv:
            break
        best = m
    return best


LAYOUT_NAMES = {cpu_fused.LAYOUT_QUAD: "quad", cpu_fused.LAYOUT_PLANE: "plane", cpu_fused.LAYOUT_DOT: "dot"}
LARGE_M_NAMES = {cpu_fused.MODE_GEMM: "gemm", cpu_fused.MODE_DENSE: "dense", cpu_fused.MODE_BF16_GEMM: "bf16_gemm"}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the GEMV/GEMM/dense timing table per layer and the measured crossovers; returns an exit code."""
    args = _parse_args(argv)
    apply_layer_options(args)
    out = sys.stdout
    out.write(f"torch {torch.__version__}, {torch.get_num_threads()} threads, group {args.group}, "
              f"fp32 matmuls with bf16 products: {'yes' if cpu_fused.fp32_matmul_allows_bf16() else 'no'}\n")
    for k, n in args.shapes:
        for bits in args.bits:
            spec = QuantSpec(bits, args.group)
            base = random_layer(k, n, spec)
            for dname in args.dtype:
                dtype = DTYPES[dname]
                # The layout the model would get for this dtype (2/3-bit fp32: the plane layout).
                first = cpu_fused.CpuFusedKernel().prepare(*base, spec, dtype, torch.device("cpu"))
                layout = cpu_fused.layout_of(first)
                pool = weight_pool(first, args.pool_mib)
                gemv_mode = cpu_fused.MODE_Q8 if layout == cpu_fused.LAYOUT_DOT else cpu_fused.MODE_F32
                modes = {"gemv": gemv_mode, "gemm": cpu_fused.MODE_GEMM, "dense": cpu_fused.MODE_DENSE}
                if dtype == torch.float32 and cpu_fused.bf16_prefill_kernel() is not None:
                    modes["bf16_gemm"] = cpu_fused.MODE_BF16_GEMM  # bf16 products, opt-in for fp32
                times: dict[str, list[float]] = {name: [] for name in modes}
                for m in args.m:
                    x = torch.randn(m, k).to(dtype)
                    for name, mode in modes.items():
                        times[name].append(time_pool(
                            lambda w, x=x, spec=spec, n=n, mode=mode, layout=layout: cpu_fused.fused_linear(
                                x, w["qw"], w["ss"], spec, n, mode=mode, layout=layout),
                            pool, args.min_time))
                large = [name for name in modes if name != "gemv"]
                found = ", ".join(f"{name} {crossover_m(times['gemv'], times[name], args.m) or 'none'}"
                                  for name in large)
                chosen = LARGE_M_NAMES[cpu_fused.large_m_mode(dtype)]
                out.write(f"\nK={k} N={n} {bits}-bit {dname}: crossover M = {found} (dispatcher: GEMM_MIN_M = "
                          f"{cpu_fused.gemm_min_m(layout, dtype)}, {chosen}, {LAYOUT_NAMES[layout]} layout)\n")
                out.write(f"  {'M':>4}" + "".join(f" {name + ' us':>12}" for name in modes) + "  fastest\n")
                for i, m in enumerate(args.m):
                    row = {name: t[i] for name, t in times.items()}
                    best = min(row, key=row.get)
                    out.write(f"  {m:>4}" + "".join(f" {row[name] * 1e6:12.1f}" for name in modes) + f"  {best}\n")
                out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
