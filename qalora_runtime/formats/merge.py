"""Fold a QA-LoRA adapter into a quantized model's float zero-points, exactly.

A base layer is ``W[k, o] = s[g, o] * (q[k, o] - z[g, o])`` with ``g = k // G``.
The adapter adds ``dW[k, o] = D[k // L, o]`` (see :mod:`.qalora_adapter`). When
the pooling size ``L`` is a multiple of the group size ``G``, every quantization
group lies inside one pooled block, so ``dW`` is constant per group and

    W + dW = s * (q - z')   with   z' = z - D[g*G // L, o] / s[g, o].

``q`` and ``s`` are untouched; only the zeros change (computed in float64,
stored float32). When ``L`` is not a multiple of ``G`` (including ``G`` a
multiple of ``L`` with ``G > L``) the update varies inside a group and one zero
per group cannot express it: that is refused, unless ``requantize=True``
explicitly asks to dequantize, add ``dW`` and re-quantize with RTN — lossy, and
the weight error it introduces is measured and reported.

The output is written to a temporary directory renamed into place at the end,
so a failed merge writes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..kernels.reference import dequantize
from ..quant.quantize import quantize_rtn
from ..quant.spec import QuantSpec
from .checkpoint import CheckpointError, MergedCheckpoint
from .gptq import is_gptq_dir, load_gptq
from .hf_files import InMemoryCheckpoint, check_output_dir, require_dir
from .qalora_adapter import CONVENTIONS, QALoraModule, pool_size_for, read_qalora_adapter

logger = logging.getLogger(__name__)


@dataclass
class ModuleMergeResult:
    """What the merge did to one layer."""

    name: str
    in_features: int
    out_features: int
    pool: int
    group_size: int
    bits: int
    scaling: float
    requantized: bool
    max_zero_shift: float  # max |z' - z| (exact merges); 0 for requantized layers
    max_abs_weight_error: float  # vs the exact float64 W + dW
    mean_abs_weight_error: float


@dataclass
class MergeReport:
    """Summary of a merge: the output directory and per-layer results."""

    out_dir: Path
    base_kind: str
    convention: str
    modules: list[ModuleMergeResult] = field(default_factory=list)

    @property
    def requantized(self) -> bool:
        """Whether any layer went through the lossy requantize path."""
        return any(m.requantized for m in self.modules)

    @property
    def max_abs_weight_error(self) -> float:
        """Largest |merged W - (W + dW)| over all merged layers."""
        return max((m.max_abs_weight_error for m in self.modules), default=0.0)

    @property
    def mean_abs_weight_error(self) -> float:
        """Mean |merged W - (W + dW)| over all merged weights."""
        total = sum(m.in_features * m.out_features for m in self.modules)
        acc = sum(m.mean_abs_weight_error * m.in_features * m.out_features for m in self.modules)
        return acc / total if total else 0.0

    def summary(self) -> str:
        """Human-readable multi-line report (printed by `qalora merge`)."""
        kind = "LOSSY (requantized)" if self.requantized else "exact (zero-point fold)"
        lines = [
            f"merged {len(self.modules)} layers into {self.out_dir}",
            f"  base: {self.base_kind}; convention: {self.convention}; merge: {kind}",
            f"  max |dW| error vs float64 W+dW: {self.max_abs_weight_error:.3e} "
            f"(mean {self.mean_abs_weight_error:.3e})",
        ]
        if not self.requantized:
            lines.append(f"  max zero-point shift: {max((m.max_zero_shift for m in self.modules), default=0.0):.4g}")
        for m in self.modules:
            if m.requantized:
                lines.append(
                    f"  {m.name}: requantized (L={m.pool}, G={m.group_size}) max err {m.max_abs_weight_error:.3e} "
                    f"mean {m.mean_abs_weight_error:.3e}"
                )
        return "\n".join(lines)


def load_base(base_dir: str | os.PathLike) -> tuple[InMemoryCheckpoint, str]:
    """Load a GPTQ dir (converted in memory) or a merged qalora dir; return it and its kind."""
    src = require_dir(base_dir, "base model")
    if is_gptq_dir(src):
        return load_gptq(src), "gptq"
    ckpt = MergedCheckpoint(src)
    tensors = {name: ckpt.tensor(name) for name in ckpt.tensor_names()}
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    return InMemoryCheckpoint(config, ckpt.quant_config, tensors, aux_dir=src), "qalora"


def _quantized_modules(ckpt: InMemoryCheckpoint) -> dict[str, QuantSpec]:
    mods = {n[: -len(".qweight")] for n in ckpt.tensors if n.endswith(".qweight")}
    return {m: ckpt.quant_config.spec_for(m) for m in sorted(mods)}


def _plan(
    adapter_modules: dict[str, QALoraModule],
    ckpt: InMemoryCheckpoint,
    requantize: bool,
) -> list[tuple[QALoraModule, QuantSpec]]:
    """Match adapter modules to base layers and check every shape before computing anything."""
    quantized = _quantized_modules(ckpt)
    unmatched = sorted(set(adapter_modules) - set(quantized))
    if unmatched:
        plain = [m for m in unmatched if f"{m}.weight" in ckpt.tensors]
        hint = f" ({', '.join(plain)} exist but are not quantized)" if plain else ""
        raise CheckpointError(
            f"{len(unmatched)} adapter module(s) match no quantized layer of the base model: "
            f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}{hint}"
        )
    plan: list[tuple[QALoraModule, QuantSpec]] = []
    not_divisible: list[str] = []
    for name, mod in adapter_modules.items():
        spec = quantized[name]
        k = ckpt.tensors[f"{name}.qweight"].shape[0] * 32 // spec.bits
        n = ckpt.tensors[f"{name}.qweight"].shape[1]
        pool = pool_size_for(mod, k, n)
        if pool % spec.group_size != 0:
            not_divisible.append(f"{name} (L={pool}, G={spec.group_size})")
        plan.append((dataclasses.replace(mod, pool=pool), spec))
    if not_divisible and not requantize:
        raise CheckpointError(
            "cannot merge exactly: the adapter's pooling size L (qalora_group_size) is not a multiple of the "
            f"base model's quantization group size G for {', '.join(not_divisible[:3])}"
            f"{' ...' if len(not_divisible) > 3 else ''}. The QA-LoRA update is constant only inside each "
            "pooled block of L inputs, so it varies inside a quantization group and one float zero-point per "
            "group cannot hold it. Retrain with L a multiple of G, or pass --requantize to dequantize, add the "
            "update and re-quantize with RTN (lossy; the error is reported)."
        )
    return plan


def _fold_exact(ckpt: InMemoryCheckpoint, mod: QALoraModule, spec: QuantSpec, convention: str) -> ModuleMergeResult:
    name = mod.name
    qweight, scales, zeros = (ckpt.tensors[f"{name}.{s}"] for s in ("qweight", "scales", "zeros"))
    k, n = qweight.shape[0] * 32 // spec.bits, qweight.shape[1]
    g = spec.group_size
    blocks = mod.delta_blocks(k, convention)  # [K/L, N]
    d = blocks[torch.arange(k // g) * g // mod.pool]  # [K/G, N]: the block each group lies in
    s = scales.to(torch.float64)
    z = zeros.to(torch.float64)
    if bool(((s == 0) & (d != 0)).any()):
        raise CheckpointError(f"{name}: a quantization group has scale 0, so no zero-point can carry the update")
    z_new = z - torch.where(s == 0, torch.zeros_like(d), d / torch.where(s == 0, torch.ones_like(s), s))
    z32 = z_new.to(torch.float32)
    ckpt.tensors[f"{name}.zeros"] = z32
    # The only loss is rounding z' to float32: |s * (z32 - z')| per weight.
    err = (s * (z32.to(torch.float64) - z_new)).abs()
    return ModuleMergeResult(
        name, k, n, mod.pool, g, spec.bits, mod.scaling, False,
        float((z_new - z).abs().max()), float(err.max()), float(err.mean()),
    )


def _requantize(ckpt: InMemoryCheckpoint, mod: QALoraModule, spec: QuantSpec, convention: str) -> ModuleMergeResult:
    name = mod.name
    qweight, scales, zeros = (ckpt.tensors[f"{name}.{s}"] for s in ("qweight", "scales", "zeros"))
    k, n = qweight.shape[0] * 32 // spec.bits, qweight.shape[1]
    target = dequantize(qweight, scales, zeros, spec, torch.float64) + mod.delta_weight(k, convention)
    q2, s2, z2 = quantize_rtn(target, spec, input_dim=0, scale_dtype=scales.dtype)
    err = (dequantize(q2, s2, z2, spec, torch.float64) - target).abs()
    ckpt.tensors[f"{name}.qweight"], ckpt.tensors[f"{name}.scales"], ckpt.tensors[f"{name}.zeros"] = q2, s2, z2
    logger.warning("%s: requantized (lossy): max abs weight error %.3e", name, float(err.max()))
    return ModuleMergeResult(
        name, k, n, mod.pool, spec.group_size, spec.bits, mod.scaling, True,
        0.0, float(err.max()), float(err.mean()),
    )


def merge_adapter(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    convention: str = "peft",
    requantize: bool = False,
) -> MergeReport:
    """Merge a QA-LoRA adapter into a GPTQ or merged-format base; write a merged checkpoint.

    Raises :class:`CheckpointError` (a ValueError) with a clear message and writes
    nothing when inputs are missing or malformed, modules do not match, or an
    exact merge is impossible and ``requantize`` is False.
    """
    if convention not in CONVENTIONS:
        raise CheckpointError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    check_output_dir(out_dir)
    adapter = read_qalora_adapter(adapter_dir, convention)
    ckpt, base_kind = load_base(base_dir)
    plan = _plan(adapter.modules, ckpt, requantize)
    report = MergeReport(Path(out_dir), base_kind, convention)
    for mod, spec in tqdm(plan, desc="merge", unit="layer", disable=None):
        if mod.pool % spec.group_size == 0:
            report.modules.append(_fold_exact(ckpt, mod, spec, convention))
        else:
            report.modules.append(_requantize(ckpt, mod, spec, convention))
    how = "requantized" if report.requantized else "exact"
    source = f"{ckpt.quant_config.source or base_kind} + qalora adapter ({convention}, {how})"
    ckpt.quant_config = dataclasses.replace(ckpt.quant_config, source=source)
    ckpt.save(out_dir)
    logger.info("merged %d layers (%s) into %s", len(report.modules), how, out_dir)
    return report
