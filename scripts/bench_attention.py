"""Decode attention (one query token over the paged KV cache): the C++ op vs PyTorch, per thread count.

    .venv/bin/python scripts/bench_attention.py [--lengths 151 1000] [--dtype bfloat16] [--threads 1 2]

Shapes are SmolLM2's: 9 query heads, 3 KV heads, head_dim 64, blocks of 16
tokens. "cold" visits 30 layers' caches right after a 64 MiB sweep, as a decode
step does (~80 MB of weights stream between two visits of a layer); "hot"
repeats one layer. The reference, in the same run, is PyTorch: gather the
sequence's keys and values through the block table and call
``scaled_dot_product_attention`` (``enable_gqa``). Best of ``--repeats`` rounds, us per layer.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from qalora_runtime.kernels.cpu_fused_build import load_extension

LAYERS, BLOCK, HEADS, KV_HEADS, DIM = 30, 16, 9, 3, 64


def _best_us(run: Callable[[], None], before: Callable[[], None], calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[151, 1000], help="tokens in the cache")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    ext = load_extension()
    if ext is None or not ext.has_avx2():
        raise SystemExit("the cpu_fused extension (AVX2) is needed")
    dtype = getattr(torch, args.dtype)
    sweep = torch.ones(64 * 1024 * 1024 // 4)
    evict = lambda: float(sweep.sum())  # noqa: E731 - evicts the caches before a cold round
    print(f"decode attention, {args.dtype}, {HEADS} heads / {KV_HEADS} KV heads x {DIM}, us per layer")
    print("| tokens | threads | ours cold | ours hot | torch cold | torch hot | cold vs torch |")
    print("|---|---|---|---|---|---|---|")
    for n in args.lengths:
        blocks = -(-n // BLOCK)
        gen = torch.Generator().manual_seed(n)
        # Each layer's blocks in a shuffled order, as a cache in use holds them.
        caches = [torch.randn(blocks, BLOCK, 2, KV_HEADS, DIM, generator=gen).to(dtype) for _ in range(LAYERS)]
        tables = torch.randperm(blocks, generator=gen).view(1, blocks)
        q = torch.randn(1, HEADS, DIM, generator=gen).to(dtype)
        lens = torch.tensor([n])
        pos = torch.arange(n)
        rows = tables[0][pos // BLOCK] * BLOCK + pos % BLOCK

        def ours(cache: torch.Tensor) -> None:
            ext.decode_attention(q, cache, tables, lens, 0, DIM ** -0.5)

        def reference(cache: torch.Tensor) -> None:
            kv = cache.view(-1, 2, KV_HEADS, DIM).index_select(0, rows)  # [n, 2, kvh, D]
            k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [kvh, n, D]
            F.scaled_dot_product_attention(q.view(HEADS, 1, DIM), k, v, enable_gqa=True)

        for threads in args.threads:
            torch.set_num_threads(threads)
            cells = []
            for op in (ours, reference):
                op(caches[0])  # warm-up
                cold = _best_us(lambda op=op: [op(c) for c in caches], evict, LAYERS, args.repeats)
                hot = _best_us(lambda op=op: [op(caches[0]) for _ in range(LAYERS)], lambda: None, LAYERS,
                               args.repeats)
                cells += [cold, hot]
            print(f"| {n} | {threads} | {cells[0]:.1f} | {cells[1]:.1f} | {cells[2]:.1f} | {cells[3]:.1f} | "
                  f"{cells[2] / cells[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
