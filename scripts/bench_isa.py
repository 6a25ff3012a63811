"""A/B of the cpu_fused kernels' instruction-set levels (AVX2 vs AVX-512) in one process.

Each layer is prepared as the model would prepare it for the dtype (layout by
dtype and bit width), and the path ``choose_mode`` picks for ``--m`` rows is
timed at every supported SIMD level, the levels interleaved ``--repeats``
times, over a pool of distinct layers larger than the L3 (as ``qalora bench
kernels`` does). Prints one table row per layer: microseconds per call and
effective GB/s of packed weight bytes per level, and the speed-up.

    python scripts/bench_isa.py --dtype fp32 --bits 2,3,4,8 --threads 2
"""

from __future__ import annotations

import argparse

import torch

from qalora_runtime.bench.common import default_pool_mib, random_layer, time_pool, weight_nbytes, weight_pool
from qalora_runtime.kernels import cpu_fused
from qalora_runtime.quant.spec import QuantSpec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="576x1536,1536x576,4096x4096", help="comma list of KxN")
    p.add_argument("--bits", default="2,3,4,8", help="comma list of bit widths")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--m", type=int, default=1, help="rows per call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="rounds of the interleaved levels")
    p.add_argument("--pool-mib", type=float, default=default_pool_mib())
    p.add_argument("--min-time", type=float, default=0.3)
    args = p.parse_args()
    isas = [isa for isa in cpu_fused.supported_isas() if isa != "scalar"]
    if not isas:
        p.error("the cpu_fused extension is not available here")
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, levels {', '.join(isas)}, "
          f"pool {args.pool_mib:.0f} MiB, M={args.m}, {args.dtype}")
    print("| KxN | bits | " + " | ".join(f"{isa} us (GB/s)" for isa in isas) + " | speed-up |")
    print("|---|---|" + "---|" * len(isas) + "---|")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        for bits in (int(b) for b in args.bits.split(",")):
            spec = QuantSpec(bits, 32)
            first = cpu_fused.CpuFusedKernel().prepare(*random_layer(k, n, spec), spec, dtype, torch.device("cpu"))
            pool, nbytes = weight_pool(first, args.pool_mib), weight_nbytes(first)
            layout = cpu_fused.layout_of(first)
            mode = cpu_fused.choose_mode(args.m, layout, dtype)
            x = torch.randn(args.m, k).to(dtype)
            best = {isa: float("inf") for isa in isas}
            for _ in range(args.repeats):
                for isa in isas:
                    t = time_pool(lambda w, isa=isa: cpu_fused.fused_linear(
                        x, w["qw"], w["ss"], spec, n, mode=mode, isa=isa, layout=layout), pool, args.min_time)
                    best[isa] = min(best[isa], t)
            cells = " | ".join(f"{best[i] * 1e6:.1f} ({nbytes / best[i] / 1e9:.1f})" for i in isas)
            print(f"| {k}x{n} | {bits} | {cells} | {best[isas[0]] / best[isas[-1]]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
