"""A random group-quantized layer shaped like a merged QA-LoRA layer, shared by the kernel tests."""

from __future__ import annotations

import torch

from qalora_runtime.quant.packing import pack_int32
from qalora_runtime.quant.spec import QuantSpec


def random_layer(k: int, n: int, spec: QuantSpec, seed: int):
    """``(levels[k, n], qweight, scales, zeros)``: GPTQ-packed levels with float zero-points."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, spec.max_q + 1, (k, n), generator=gen, dtype=torch.int32)
    groups = k // spec.group_size
    scales = torch.rand(groups, n, generator=gen) * 0.02 + 0.001
    # Real-valued zeros a bit outside the level range, as a merged QA-LoRA layer has.
    zeros = torch.rand(groups, n, generator=gen) * (spec.max_q + 2) - 1.0
    return levels, pack_int32(levels, spec.bits, dim=0), scales, zeros
