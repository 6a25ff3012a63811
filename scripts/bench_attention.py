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


def _ops(ext, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, rows: torch.Tensor):
    """The two implementations, each taking one layer's cache."""

    def ours(cache: torch.Tensor) -> None:
        ext.decode_attention(q, cache, tables, lens, 0, DIM ** -0.5)

    def reference(cache: torch.Tensor) -> None:
        kv = cache.view(-1, 2, KV_HEADS, DIM).index_select(0, rows)  # [n, 2, kvh, D]
        k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [kvh, n, D]
        F.scaled_dot_product_attention(q.view(HEADS, 1, DIM), k, v, enable_gqa=True)

    return ours, reference


def _cold_hot(op: Callable[[torch.Tensor], None], caches: list[torch.Tensor], evict: Callable[[], None],
              repeats: int) -> tuple[float, float]:
    """us per layer: every layer's cache once after ``evict``, and the first layer's again and again."""
    op(caches[0])  # warm-up
    cold = _best_us(lambda: [op(c) for c in caches], evict, LAYERS, repeats)
    hot = _best_us(lambda: [op(caches[0]) for _ in range(LAYERS)], lambda: None, LAYERS, repeats)
    return cold, hot


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

    def evict() -> None:  # reads 64 MiB: the caches are cold for the next round
        float(sweep.sum())

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
        pos = torch.arange(n)
        rows = tables[0][pos // BLOCK] * BLOCK + pos % BLOCK
        ours, reference = _ops(ext, q, tables, torch.tensor([n]), rows)
        for threads in args.threads:
            torch.set_num_threads(threads)
            (oc, oh), (tc, th) = (_cold_hot(op, caches, evict, args.repeats) for op in (ours, reference))
            print(f"| {n} | {threads} | {oc:.1f} | {oh:.1f} | {tc:.1f} | {th:.1f} | {tc / oc:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
