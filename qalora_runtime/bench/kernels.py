"""``qalora bench kernels``: packed-linear kernels vs dense fp32/bf16 matmul, per shape and M.

Each timing cycles through a pool of distinct layers larger than the L3 cache
(``--pool-mib``), so the numbers measure weight streaming from memory, not cache
hits. Effective GB/s counts the bytes a kernel must read for its weights (packed
levels + scales/zeros; dense: K*N*itemsize). Speed-ups are against dense fp32
and dense bf16 ``x @ W`` measured in the same run. Run as
``python -m qalora_runtime.bench.kernels --help``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from ..kernels import cpu_fused
from ..kernels.registry import available_kernels
from ..quant.spec import QuantSpec
from .common import (
    DTYPES,
    add_layer_options,
    apply_layer_options,
    bit_width,
    check_layer_options,
    csv_list,
    pool_size,
    positive_int,
    random_layer,
    time_pool,
    weight_nbytes,
    weight_pool,
)

DEFAULT_SHAPES = "576x576,576x1536,1536x576,4096x4096,4096x11008,11008x4096"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qalora bench kernels", description=__doc__.splitlines()[0])
    add_layer_options(p, DEFAULT_SHAPES, "bf16,fp32", 0)
    p.add_argument("--m", type=csv_list(positive_int, "row counts"), default="1,4,16,64,256",
                   help="comma list of row counts M")
    p.add_argument("--bits", type=csv_list(bit_width, "bit widths"), default="2,3,4,8", help="comma list of bit widths")
    p.add_argument("--kernels", default="", help="comma list of kernel names (default: all CPU ones)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per entry")
    p.add_argument("--max-call", type=float, default=3.0,
                   help="skip a dense baseline whose single call is predicted above this (s)")
    args = p.parse_args(argv)
    unknown = sorted({s for s in args.kernels.split(",") if s} - set(available_kernels()))
    if unknown:
        p.error(f"unknown kernel(s) {', '.join(unknown)}; available: {', '.join(sorted(available_kernels()))}")
    check_layer_options(p, args)
    return args


def streaming_read_gbps(mib: int = 256) -> float:
    """Measured streaming read bandwidth: best of a reduction and a fp32 GEMV over ``mib`` MiB."""
    a = torch.ones(mib * 1024 * 1024 // 4)
    mat, vec = a.view(-1, 4096), torch.ones(4096)
    best = 0.0
    for fn in (lambda: a.sum(), lambda: mat @ vec):
        fn()
        t = time.perf_counter()
        for _ in range(4):
            fn()
        best = max(best, a.numel() * 4 * 4 / (time.perf_counter() - t) / 1e9)
    return best


class _Row:
    """One table line: a label, seconds per call and the weight bytes streamed per call."""

    def __init__(self, label: str, seconds: float | None, nbytes: int, note: str = "") -> None:
        self.label, self.seconds, self.nbytes, self.note = label, seconds, nbytes, note


def _dense_rows(k: int, n: int, ms: list[int], args: argparse.Namespace) -> dict[tuple[str, int], _Row]:
    rows: dict[tuple[str, int], _Row] = {}
    for name, dtype in DTYPES.items():
        nbytes = k * n * dtype.itemsize
        pool = [torch.randn(k, n).to(dtype) for _ in range(pool_size(nbytes, args.pool_mib))]
        per_row: float | None = None
        for m in ms:
            if per_row is not None and per_row * m > args.max_call:
                rows[(name, m)] = _Row(f"dense {name}", None, nbytes, f"skipped (~{per_row * m:.0f} s/call)")
                continue
            x = torch.randn(m, k).to(dtype)
            sec = time_pool(lambda w, x=x: x @ w, pool, args.min_time)
            per_row = sec / m
            rows[(name, m)] = _Row(f"dense {name}", sec, nbytes)
    return rows


def _kernel_rows(k: int, n: int, bits: int, ms: list[int], args: argparse.Namespace) -> list[tuple[int, _Row]]:
    spec = QuantSpec(bits, args.group)
    wanted = [s for s in args.kernels.split(",") if s]
    base = random_layer(k, n, spec)
    out: list[tuple[int, _Row]] = []
    for name, cls in sorted(available_kernels().items()):
        if (wanted and name not in wanted) or (not wanted and name == "dequant_fallback"):
            continue
        for dname in args.dtype:
            dtype = DTYPES[dname]
            if not cls.supports(spec, k, n, torch.device("cpu"), dtype):
                continue
            kernel = cls()
            first = kernel.prepare(*base, spec, dtype, torch.device("cpu"))
            nbytes = weight_nbytes(first)
            pool = weight_pool(first, args.pool_mib)
            for m in ms:
                x = torch.randn(m, k).to(dtype)
                sec = time_pool(lambda w, x=x, kernel=kernel: kernel.forward(x, w, spec), pool, args.min_time)
                out.append((m, _Row(f"{name} {bits}b {dname}", sec, nbytes)))
    return out


def _fmt(row: _Row, fp32: _Row, bf16: _Row) -> str:
    if row.seconds is None:
        return f"  {row.label:<28} {row.note}"
    gbps = row.nbytes / row.seconds / 1e9
    ratios = []
    for ref in (fp32, bf16):
        ratios.append(f"{ref.seconds / row.seconds:7.2f}x" if ref.seconds else "    n/a ")
    return f"  {row.label:<28} {row.seconds * 1e6:10.1f} {gbps:8.2f}  {ratios[0]}  {ratios[1]}"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the kernel benchmark tables; returns a process exit code."""
    args = _parse_args(argv)
    apply_layer_options(args)
    ms, bits_list, shapes = args.m, args.bits, args.shapes
    out = sys.stdout
    out.write(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}, group {args.group}, "
              f"fp32 matmuls with bf16 products: {'yes' if cpu_fused.fp32_matmul_allows_bf16() else 'no'}\n")
    out.write(f"streaming read bandwidth: {streaming_read_gbps():.1f} GB/s\n")
    for k, n in shapes:
        dense = _dense_rows(k, n, ms, args)
        rows: list[tuple[int, _Row]] = []
        for bits in bits_list:
            rows.extend(_kernel_rows(k, n, bits, ms, args))
        for m in ms:
            fp32, bf16 = dense[("fp32", m)], dense[("bf16", m)]
            out.write(f"\nK={k} N={n} M={m}\n  {'kernel':<28} {'us/call':>10} {'GB/s':>8}  {'vs fp32':>8}  {'vs bf16':>8}\n")
            for row in [fp32, bf16] + [r for mm, r in rows if mm == m]:
                out.write(_fmt(row, fp32, bf16) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
