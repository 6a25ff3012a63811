"""Helpers shared by the kernel benchmarks: validated option parsers, pool timing, random layers."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..quant.packing import pack_int32
from ..quant.spec import QuantSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def csv_list(convert: Callable[[str], object], what: str) -> Callable[[str], list]:
    """An argparse ``type`` for a comma list: each item through ``convert``, a clear error otherwise."""
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {what}, got {text!r}")
        try:
            return [convert(item) for item in items]
        except (KeyError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"bad {what} in {text!r}: {exc}") from None
    return parse


def positive_int(text: str) -> int:
    """A positive integer (argparse item)."""
    value = int(text)
    if value <= 0:
        raise ValueError(f"{value} is not positive")
    return value


def bit_width(text: str) -> int:
    """A supported bit width: 2, 3, 4 or 8."""
    value = int(text)
    if value not in (2, 3, 4, 8):
        raise ValueError(f"{value} is not one of 2, 3, 4, 8")
    return value


def kxn_shape(text: str) -> tuple[int, int]:
    """``KxN`` (in x out features) as two positive integers."""
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"{text!r} is not KxN")
    return positive_int(parts[0]), positive_int(parts[1])


def dtype_name(text: str) -> str:
    """A key of ``DTYPES``."""
    if text not in DTYPES:
        raise ValueError(f"{text!r} is not one of {', '.join(DTYPES)}")
    return text


def time_pool(fn: Callable[[object], object], pool: Sequence[object], min_time: float) -> float:
    """Seconds per call, cycling through ``pool``: the 20th percentile of single calls.

    Calls run until ``min_time`` has passed and the whole pool was visited (at
    least 3 calls). A low percentile, not the mean, because the machine may be
    shared: a call that was preempted only ever takes longer.
    """
    fn(pool[0])
    times: list[float] = []
    start, i = time.perf_counter(), 1
    while True:
        t0 = time.perf_counter()
        fn(pool[i % len(pool)])
        t1 = time.perf_counter()
        times.append(t1 - t0)
        i += 1
        if t1 - start >= min_time and len(times) >= 3 and (len(times) >= len(pool) or t1 - start >= 4 * min_time):
            times.sort()
            return times[len(times) // 5]


def random_layer(k: int, n: int, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random GPTQ-layout layer: packed ``qweight[K*bits/32, N]``, ``scales`` and float ``zeros``."""
    levels = torch.randint(0, spec.max_q + 1, (k, n), dtype=torch.int32)
    groups = k // spec.group_size
    scales = torch.rand(groups, n) * 0.02 + 1e-3
    zeros = torch.rand(groups, n) * spec.max_q
    return pack_int32(levels, spec.bits, dim=0), scales, zeros


def pool_size(layer_bytes: int, pool_mib: float) -> int:
    """How many copies of a layer make ``pool_mib`` MiB (at least one)."""
    return max(1, math.ceil(pool_mib * 2**20 / max(layer_bytes, 1)))


def l3_cache_mib() -> float | None:
    """The largest CPU cache's size in MiB from Linux sysfs (None where it cannot be read)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(text[-1:], None)
        try:
            sizes.append(float(text[:-1]) * scale if scale else float(text) / 2**20)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def default_pool_mib() -> float:
    """Bytes to cycle through per timing: 3x the last-level cache (at least 96 MiB), so weights stream from DRAM."""
    l3 = l3_cache_mib()
    return max(96.0, 3 * l3) if l3 else 96.0


def add_layer_options(p: argparse.ArgumentParser, shapes: str, dtypes: str, threads: int) -> None:
    """The options every kernel bench shares: layer shapes, group size, activation dtypes, pool size, threads."""
    p.add_argument("--shapes", type=csv_list(kxn_shape, "KxN shapes"), default=shapes,
                   help="comma list of KxN (in x out features)")
    p.add_argument("--group", type=int, default=32, help="quantization group size")
    p.add_argument("--dtype", type=csv_list(dtype_name, "dtypes"), default=dtypes,
                   help=f"activation dtypes ({', '.join(DTYPES)})")
    p.add_argument("--pool-mib", type=float, default=default_pool_mib(),
                   help="MiB of distinct layers cycled per timing (default: 3x this CPU's L3, >= 96)")
    p.add_argument("--threads", type=int, default=threads, help="torch threads (0: leave as is)")
    p.add_argument("--fp32-matmul-precision", choices=("highest", "high", "medium"), default=None,
                   help="torch.set_float32_matmul_precision for the run ('medium' lets fp32 layers "
                        "prefill with bf16 products; default: leave torch's setting)")


def apply_layer_options(args: argparse.Namespace) -> None:
    """Apply the process-wide options of ``add_layer_options``: thread count and fp32 matmul precision."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fp32_matmul_precision:
        torch.set_float32_matmul_precision(args.fp32_matmul_precision)


def check_layer_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error when ``--group`` does not divide some shape's K."""
    for k, _ in args.shapes:
        if k % args.group:
            p.error(f"--group {args.group} does not divide K={k}")


def weight_nbytes(weights: dict[str, torch.Tensor]) -> int:
    """Bytes a prepared layer's tensors occupy (what one call streams)."""
    return sum(t.numel() * t.element_size() for t in weights.values())


def weight_pool(weights: dict[str, torch.Tensor], pool_mib: float) -> list[dict[str, torch.Tensor]]:
    """``weights`` plus clones, ``pool_mib`` MiB in all: cycling through them defeats the caches."""
    copies = pool_size(weight_nbytes(weights), pool_mib) - 1
    return [weights] + [{key: t.clone() for key, t in weights.items()} for _ in range(copies)]
