"""Prefill time of one prompt on the default model per value of cpu_fused's GEMV/GEMM switch.

    .venv/bin/python scripts/bench_prefill_switch.py --values 16 256:gemm 100000 [--dtype bfloat16]

For each prompt length, one ``ModelRunner`` prefills the same prompt with
``GEMM_MIN_M`` of the model's layout set to each value in turn (alternating,
``--repeats`` rounds, one process), and the table shows the best time per value.
A value above the prompt length means the prompt runs the layout's GEMV. A value
``V:gemm`` switches at V to the tiled fp32 GEMM instead of the bf16 large-M
kernel (AMX or AVX512-BF16), which is how a bf16 model ran before that kernel.
With ``--dtype float32 --fp32-matmul-precision medium`` a plain ``V`` column is
the opt-in bf16-product prefill and ``V:gemm`` the exact tiled GEMM.
"""

from __future__ import annotations

import argparse
import time

import torch

from qalora_runtime.engine.simple_generate import blocks_needed
from qalora_runtime.formats.default_model import ensure_default_model
from qalora_runtime.kernels import cpu_fused
from qalora_runtime.models.loader import load_model
from qalora_runtime.quant.spec import QuantSpec
from qalora_runtime.worker.kv_cache import KVCache
from qalora_runtime.worker.model_runner import ModelRunner, SequenceInput

BLOCK = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", nargs="+", required=True, help="GEMM_MIN_M values to compare (V or V:gemm)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512], help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=4, help="alternating rounds (best is reported)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--fp32-matmul-precision", choices=["highest", "high", "medium"], default=None,
                        help="torch.set_float32_matmul_precision for the run (medium: fp32 prefill in bf16)")
    args = parser.parse_args()
    if args.fp32_matmul_precision:
        torch.set_float32_matmul_precision(args.fp32_matmul_precision)
    model, cfg = load_model(ensure_default_model(), args.dtype)
    # The default model's linears are 4-bit: the layout they get for this dtype.
    key = cpu_fused.layout_for(QuantSpec(4, 32), model.dtype)
    kept = cpu_fused.gemm_min_m(key, model.dtype)  # the switch of the kernel in use
    kept_gemm = cpu_fused.GEMM_MIN_M[key]  # the tiled GEMM's, which V:gemm columns move
    kept_kernel = cpu_fused.bf16_prefill_kernel()
    columns = {v: (int(v.split(":")[0]), v.endswith(":gemm")) for v in args.values}
    print("| prompt tokens | " + " | ".join(f"GEMM_MIN_M {v}" for v in args.values) + " |")
    print("|---|" + "---|" * len(args.values))
    try:
        for n in args.lengths:
            ids = [(i * 7919) % 40000 + 100 for i in range(n)]  # arbitrary in-vocabulary tokens
            table = list(range(blocks_needed(n + 1, BLOCK)))
            runner = ModelRunner(model, KVCache.for_model(cfg, len(table), BLOCK, model.dtype), BLOCK)
            best = {v: float("inf") for v in args.values}
            for _ in range(args.repeats):
                for v, (switch, gemm) in columns.items():
                    # The switch is set with the kernel chosen: it belongs to that kernel's table.
                    cpu_fused.set_bf16_prefill_kernel(None if gemm else kept_kernel)
                    cpu_fused.set_gemm_min_m(key, model.dtype, switch)
                    start = time.perf_counter()
                    runner.execute([SequenceInput(ids, 0, table)])
                    best[v] = min(best[v], time.perf_counter() - start)
            print(f"| {n} | " + " | ".join(f"{best[v] * 1e3:.1f} ms" for v in args.values) + " |", flush=True)
    finally:
        cpu_fused.GEMM_MIN_M[key] = kept_gemm
        cpu_fused.set_bf16_prefill_kernel(kept_kernel)
        cpu_fused.set_gemm_min_m(key, model.dtype, kept)


if __name__ == "__main__":
    main()
