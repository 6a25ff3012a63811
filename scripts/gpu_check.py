#!/usr/bin/env python
"""One prepared GPU check of the Triton kernels (``qalora_runtime/kernels/triton_fused.py``).

On an NVIDIA GPU it

1. checks ``gemv``, ``gemm`` and ``forward`` (the M dispatch) against the
   float64 reference dequantizer for every bit width (2/3/4/8), group size
   (32/64/128), activation dtype (fp16/bf16) and M in {1, 4, 16, 64, 256} on a
   few layer shapes, with the bounds of ``tests/unit/test_triton_kernels.py``
   (GPU casts round to nearest, so the output bound is the unit roundoff ``u``);
2. times the kernels against dense ``x @ W`` in fp32 and in bf16 with CUDA
   events (L2 flushed before every call, median of ``--reps``), as ``qalora
   bench kernels`` does on CPU, and prints a markdown table: time, effective
   GB/s of weight bytes read (packed levels + fp32 scales/zeros), speed-up
   over dense fp32 and dense bf16, next to the device's measured streaming read
   bandwidth;
3. measures the GEMV/GEMM crossover M and compares it with ``GEMV_MAX_M``.

Usage::

    python scripts/gpu_check.py                   # everything (meant to take < 5 min on an H100)
    python scripts/gpu_check.py --quick           # G=128 and M in {1, 16, 256} only
    python scripts/gpu_check.py --json out.json   # also write every number as JSON

Exit status: 0 every check passed; 1 some result exceeded its bound (listed);
2 no CUDA device or no triton: nothing was checked (this script only makes
sense on a GPU); 3 ``--check-budget-s`` ran out before the correctness sweep
finished (what ran is reported, timing still runs). Triton compiles about five
kernel variants per (bits, G, dtype); those compiles dominate the sweep. ``--cpu-interpret`` runs a tiny version on CPU
under Triton's interpreter (no meaningful timings) to test this script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 0.0}
#: fp32 accumulation over K up to ~11k in a different order than float64 (and tensor-core
#: accumulation) stays far below this; any packing/indexing bug is orders of magnitude above.
ACC_SLACK = 5e-5
#: GEMM vs the *true* reference also carries the weight's rounding to fp16/bf16; that error
#: is statistical (~u of max|y| on random data), so this bound is a sanity check, not a proof.
GEMM_TRUE_REF_FACTOR = 8.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="576x1536,4096x4096", help="KxN layers for the correctness sweep")
    p.add_argument("--timing-shapes", default="576x576,576x1536,1536x576,4096x4096,4096x11008,11008x4096",
                   help="KxN layers to time")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--groups", default="32,64,128")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--m", default="1,4,16,64,256", help="batch rows M")
    p.add_argument("--crossover-shapes", default="576x1536,4096x4096", help="KxN layers for the crossover (4-bit)")
    p.add_argument("--crossover-m", default="1,2,3,4,6,8,12,16,24,32,48,64")
    p.add_argument("--reps", type=int, default=30, help="timed calls per measurement (median)")
    p.add_argument("--quick", action="store_true", help="G=128 and M in {1,16,256} only")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--check-budget-s", type=float, default=170.0,
                   help="stop the correctness sweep after this many seconds (mostly Triton compiles)")
    p.add_argument("--budget-s", type=float, default=240.0, help="start no new timing work after this many seconds")
    p.add_argument("--json", type=Path, help="write all results to this file")
    p.add_argument("--cpu-interpret", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.groups, args.m = "128", "1,16,256"
    if args.cpu_interpret:  # a dry run of this script: tiny shapes, no timing table worth reading
        args.shapes, args.timing_shapes, args.crossover_shapes, args.m = "128x64", "128x64", "128x64", "1,4,16"
        args.crossover_m, args.reps = "1,4,16", 2
    return args


def ints(csv: str) -> list[int]:
    return [int(v) for v in csv.split(",") if v]


def shapes(csv: str) -> list[tuple[int, int]]:
    return [tuple(int(d) for d in s.split("x")) for s in csv.split(",") if s]  # type: ignore[misc]


class Checker:
    """Runs the sweep, collects failures and rows."""

    def __init__(self, args: argparse.Namespace, device: Any) -> None:
        import torch

        from qalora_runtime.kernels import triton_fused as tf
        from qalora_runtime.kernels.reference import dequantize
        from qalora_runtime.quant.packing import unpack_int32
        from qalora_runtime.quant.spec import QuantSpec

        self.torch, self.tf, self.dequantize, self.unpack, self.QuantSpec = torch, tf, dequantize, unpack_int32, QuantSpec
        self.args, self.device = args, device
        self.t0 = time.monotonic()
        self.failures: list[str] = []
        self.checks: list[dict[str, Any]] = []
        self.timings: list[dict[str, Any]] = []
        self.crossover: list[dict[str, Any]] = []
        self.incomplete = False
        self.cuda = device.type == "cuda"
        # A buffer larger than any L2 (H100/H200: 50 MiB), zeroed before each timed call.
        self.flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device) if self.cuda else None
        self._dense: dict[tuple[int, int, int], dict[str, float]] = {}
        self.bandwidth_gbs: float | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ layers

    def layer(self, k: int, n: int, bits: int, group: int, seed: int) -> dict[str, Any]:
        """A random layer: any int32 word is a valid packing of random levels, for every bit width."""
        torch = self.torch
        gen = torch.Generator().manual_seed(seed)
        spec = self.QuantSpec(bits, group)
        qweight = torch.randint(-(2**31), 2**31 - 1, (k * bits // 32, n), generator=gen, dtype=torch.int32)
        scales = torch.rand(k // group, n, generator=gen) * 0.02 + 0.001
        zeros = torch.rand(k // group, n, generator=gen) * (spec.max_q + 2) - 1.0  # real-valued, as merged
        w64 = self.dequantize(qweight, scales, zeros, spec, torch.float64).to(self.device)  # the oracle
        levels = self.unpack(qweight, bits, dim=0).to(self.device)
        s32 = scales.to(self.device).repeat_interleave(group, dim=0)
        z32 = zeros.to(self.device).repeat_interleave(group, dim=0)
        w32 = (levels.to(torch.float32) - z32) * s32  # what the kernels compute before any cast
        weights = self.tf.TritonFusedKernel().prepare(qweight, scales, zeros, spec, torch.float16, self.device)
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        return {"spec": spec, "w64": w64, "w32": w32, "weights": weights, "bytes": nbytes}

    # ------------------------------------------------------------------ correctness

    def check(self, shape: tuple[int, int], bits: int, group: int, dtype_name: str, lay: dict[str, Any]) -> None:
        torch, tf = self.torch, self.tf
        dtype = getattr(torch, dtype_name)
        u = UNIT_ROUNDOFF[dtype_name]
        k, n = shape
        spec, weights = lay["spec"], lay["weights"]
        w32 = lay["w32"]
        if dtype == torch.bfloat16 and self.args.cpu_interpret:
            # Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): one ulp = 2u.
            u, w32 = 2 * u, (w32.view(torch.int32) & -65536).view(torch.float32)
        w_dot = w32.to(dtype).to(torch.float64)
        kernel = tf.TritonFusedKernel()
        for m in ints(self.args.m):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(self.device)
            ref = x.double() @ lay["w64"]
            ref_dot = x.double() @ w_dot
            scale = float(ref.abs().max())
            y_gemv = tf.gemv(x, weights, spec)
            y_gemm = tf.gemm(x, weights, spec)
            y_fwd = kernel.forward(x, weights, spec)
            path = "gemv" if m <= tf.GEMV_MAX_M else "gemm"
            errs = {
                "gemv": float((y_gemv.double() - ref).abs().max()) / scale,
                "gemm_vs_rounded_w": float((y_gemm.double() - ref_dot).abs().max()) / scale,
                "gemm": float((y_gemm.double() - ref).abs().max()) / scale,
            }
            bounds = {"gemv": u + ACC_SLACK, "gemm_vs_rounded_w": u + ACC_SLACK, "gemm": GEMM_TRUE_REF_FACTOR * u + ACC_SLACK}
            tag = f"{k}x{n} {bits}-bit g{group} {dtype_name} M={m}"
            for name, err in errs.items():
                if not err <= bounds[name]:  # also catches NaN
                    self.failures.append(f"{tag}: {name} error {err:.3g} > bound {bounds[name]:.3g}")
            if not torch.equal(y_fwd, y_gemv if path == "gemv" else y_gemm):
                self.failures.append(f"{tag}: forward does not equal the {path} path it should dispatch to")
            self.checks.append({"shape": f"{k}x{n}", "bits": bits, "group": group, "dtype": dtype_name, "m": m, **errs})

    def run_checks(self) -> None:
        torch = self.torch
        for shape in shapes(self.args.shapes):
            for bits in ints(self.args.bits):
                for group in ints(self.args.groups):
                    if self.elapsed() > self.args.check_budget_s:
                        self.incomplete = True
                        print(f"check budget of {self.args.check_budget_s:.0f} s used up: correctness sweep "
                              "stopped early", flush=True)
                        return
                    lay = self.layer(*shape, bits, group, seed=bits * 100 + group)
                    for dtype_name in self.args.dtypes.split(","):
                        self.check(shape, bits, group, dtype_name, lay)
                    worst = max(max(c["gemv"], c["gemm_vs_rounded_w"]) for c in self.checks[-len(ints(self.args.m)):])
                    print(f"[{self.elapsed():6.1f}s] checked {shape[0]}x{shape[1]} {bits}-bit g{group} "
                          f"(last dtype worst tight err {worst:.2e})", flush=True)
                    del lay
                    if self.cuda:
                        torch.cuda.empty_cache()

    # ------------------------------------------------------------------ timing

    def time_us(self, fn: Callable[..., Any], *args: Any) -> float:
        """Median device time of ``fn(*args)`` in microseconds (CUDA events; L2 flushed before each call)."""
        torch = self.torch
        fn(*args)  # compile / warm up
        if not self.cuda:
            t = time.perf_counter()
            fn(*args)
            return (time.perf_counter() - t) * 1e6
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.args.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.args.reps)]
        for s, e in zip(starts, ends):
            self.flush.zero_()  # queued ahead, so the launch below overlaps it: events time the kernel(s)
            s.record()
            fn(*args)
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3

    def dense_us(self, k: int, n: int, m: int, w64: Any) -> dict[str, float]:
        """Dense ``x @ W`` in fp32 and bf16 for one (K, N, M), timed once per run (not per bit width)."""
        key = (k, n, m)
        if key not in self._dense:
            torch = self.torch
            self._dense[key] = {}
            for name in ("float32", "bfloat16"):
                dtype = getattr(torch, name)
                x = torch.randn(m, k, device=self.device).to(dtype)
                self._dense[key][name] = self.time_us(torch.matmul, x, w64.to(dtype))
        return self._dense[key]

    def read_gbps(self) -> float:
        """Streaming read bandwidth of the device: a sum over 1 GiB (CPU dry run: 64 MiB).

        Its own buffer, not ``flush``: ``time_us`` zeroes ``flush`` before every call,
        which would leave the buffer's tail in L2.
        """
        torch = self.torch
        buf = torch.ones((2**28 if self.cuda else 2**24), dtype=torch.int32, device=self.device)
        buf_bytes = buf.numel() * buf.element_size()
        us = self.time_us(torch.sum, buf)
        del buf
        return buf_bytes / us / 1e3

    def run_timing(self) -> None:
        torch, tf = self.torch, self.tf
        for k, n in shapes(self.args.timing_shapes):
            for bits in ints(self.args.bits):
                if self.elapsed() > self.args.budget_s:
                    print("budget used up: timing stopped early", flush=True)
                    return
                group = 128 if 128 in ints(self.args.groups) else ints(self.args.groups)[-1]
                lay = self.layer(k, n, bits, group, seed=bits)
                for dtype_name in self.args.dtypes.split(","):
                    dtype = getattr(torch, dtype_name)
                    spec, weights = lay["spec"], lay["weights"]
                    for m in ints(self.args.m):
                        x = torch.randn(m, k, device=self.device).to(dtype)
                        dense = self.dense_us(k, n, m, lay["w64"])
                        t_gemv = self.time_us(tf.gemv, x, weights, spec)
                        t_gemm = self.time_us(tf.gemm, x, weights, spec)
                        path = "gemv" if m <= tf.GEMV_MAX_M else "gemm"
                        t_fwd = t_gemv if path == "gemv" else t_gemm
                        self.timings.append({
                            "shape": f"{k}x{n}", "bits": bits, "group": group, "dtype": dtype_name, "m": m,
                            "dense_fp32_us": dense["float32"], "dense_bf16_us": dense["bfloat16"],
                            "gemv_us": t_gemv, "gemm_us": t_gemm, "path": path,
                            "weight_gbs": lay["bytes"] / t_fwd / 1e3,
                            "vs_fp32": dense["float32"] / t_fwd, "vs_bf16": dense["bfloat16"] / t_fwd,
                        })  # fmt: skip
                del lay
                print(f"[{self.elapsed():6.1f}s] timed {k}x{n} {bits}-bit", flush=True)

    def run_crossover(self) -> None:
        torch, tf = self.torch, self.tf
        for k, n in shapes(self.args.crossover_shapes):
            if self.elapsed() > self.args.budget_s:
                print("budget used up: crossover stopped early", flush=True)
                return
            lay = self.layer(k, n, 4, 128 if 128 in ints(self.args.groups) else ints(self.args.groups)[-1], seed=4)
            for dtype_name in self.args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                rows = []
                for m in ints(self.args.crossover_m):
                    x = torch.randn(m, k, device=self.device).to(dtype)
                    t_gemv = self.time_us(tf.gemv, x, lay["weights"], lay["spec"])
                    t_gemm = self.time_us(tf.gemm, x, lay["weights"], lay["spec"])
                    rows.append((m, t_gemv, t_gemm))
                # Largest M below which GEMV always wins (the value GEMV_MAX_M should take).
                best = 0
                for m, t_gemv, t_gemm in rows:
                    if t_gemv > t_gemm:
                        break
                    best = m
                self.crossover.append({"shape": f"{k}x{n}", "dtype": dtype_name, "gemv_max_m": best,
                                       "rows": [{"m": m, "gemv_us": a, "gemm_us": b} for m, a, b in rows]})

    # ------------------------------------------------------------------ report

    def report(self, device_name: str) -> str:
        out = [f"## Triton kernels on {device_name}", ""]
        if self.checks:
            worst = {key: max(c[key] for c in self.checks) for key in ("gemv", "gemm_vs_rounded_w", "gemm")}
            out += [f"Correctness: {len(self.checks)} (shape, bits, G, dtype, M) cases, 3 paths each; worst "
                    f"error / max|y|: gemv {worst['gemv']:.2e}, gemm vs dtype-rounded W {worst['gemm_vs_rounded_w']:.2e}, "
                    f"gemm vs exact W {worst['gemm']:.2e}; failures: {len(self.failures)}"
                    + (" (sweep INCOMPLETE: budget)" if self.incomplete else ""), ""]
        if self.bandwidth_gbs is not None:
            out += [(f"Streaming read bandwidth (a sum over 1 GiB; 64 MiB in the CPU dry run): "
                     f"{self.bandwidth_gbs:.0f} GB/s"), ""]
        if self.timings:
            out += [("| K x N | bits | G | dtype | M | dense fp32 us | dense bf16 us | gemv us | gemm us | forward "
                     "| weight GB/s | vs dense fp32 | vs dense bf16 |"),
                    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in self.timings:
                out.append(f"| {r['shape']} | {r['bits']} | {r['group']} | {r['dtype']} | {r['m']} | "
                           f"{r['dense_fp32_us']:.1f} | {r['dense_bf16_us']:.1f} | {r['gemv_us']:.1f} | "
                           f"{r['gemm_us']:.1f} | {r['path']} | {r['weight_gbs']:.0f} | "
                           f"{r['vs_fp32']:.2f}x | {r['vs_bf16']:.2f}x |")
            out.append("")
        for c in self.crossover:
            pts = ", ".join(f"M={r['m']}: {r['gemv_us']:.0f}/{r['gemm_us']:.0f}" for r in c["rows"])
            out.append(f"Crossover {c['shape']} 4-bit {c['dtype']} (gemv/gemm us): {pts} -> GEMV wins up to "
                       f"M={c['gemv_max_m']} (GEMV_MAX_M is {self.tf.GEMV_MAX_M})")
        return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: it fixes the mode then
    import torch

    if not args.cpu_interpret and not torch.cuda.is_available():
        print("no CUDA device: nothing checked (this script needs an NVIDIA GPU)")
        return 2
    try:
        import triton
    except ImportError:
        print("triton is not installed: pip install 'qalora-serve[gpu]'")
        return 2
    device = torch.device("cpu" if args.cpu_interpret else "cuda")
    name = "CPU (Triton interpreter)" if args.cpu_interpret else torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    checker = Checker(args, device)
    checker.run_checks()
    if not args.skip_timing:
        checker.bandwidth_gbs = checker.read_gbps()
        checker.run_timing()
        if checker.elapsed() <= args.budget_s:
            checker.run_crossover()
    print(checker.report(name))
    for f in checker.failures:
        print("FAIL", f)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "checks": checker.checks, "timings": checker.timings,
                                         "crossover": checker.crossover, "failures": checker.failures,
                                         "read_gbs": checker.bandwidth_gbs,
                                         "incomplete": checker.incomplete, "elapsed_s": checker.elapsed()}, indent=1))
    print(f"total {checker.elapsed():.0f} s")
    if checker.failures:
        return 1
    return 3 if checker.incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
