"""Read a QA-LoRA adapter saved by PEFT and compute the weight update it stands for.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with tensors named like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (``[r, K/L]``)
and ``...lora_B.weight`` (``[N, r]``). The adapter pools the input in blocks of
``L`` features. Two conventions exist for the pooled input:

* ``peft`` (``QALoraLinearVariant.forward``): ``mean_L(x) * (K/L)``;
* ``qalora`` (the original QA-LoRA code, ``nn.AvgPool1d``): ``mean_L(x)``.

Either way the update is ``y += pooled(x) @ A^T @ B^T * scaling``, i.e. a weight
delta ``dW[k, o] = c * (B @ A)[o, k // L] * scaling`` with ``c = (K/L) / L``
(peft) or ``1 / L`` (qalora), constant inside each pooled block.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import CheckpointError
from .hf_files import iter_tensors, read_json, require_dir

logger = logging.getLogger(__name__)

CONVENTIONS = ("peft", "qalora")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT options that change what the adapter computes in ways a zero-point fold cannot express.
_UNSUPPORTED_TRUTHY = (
    "use_dora", "lora_bias", "modules_to_save", "fan_in_fan_out", "alora_invocation_tokens",
    "trainable_token_indices", "layer_replication", "target_parameters", "use_bdlora",
    "monteclora_config", "velora_config", "arrow_config", "kasa_config",
)
_TENSOR_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class QALoraModule:
    """The QA-LoRA factors of one linear layer: ``A [r, K/L]``, ``B [N, r]``, pooling ``L``, ``scaling``."""

    name: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    pool: int
    scaling: float

    def delta_blocks(self, in_features: int, convention: str) -> torch.Tensor:
        """The weight update per pooled block, float64 ``[K/L, N]``: ``dW[k, o] = D[k // L, o]``."""
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        blocks = in_features // self.pool
        factor = self.scaling / self.pool * (blocks if convention == "peft" else 1)
        ba = self.lora_b.to(torch.float64) @ self.lora_a.to(torch.float64)  # [N, K/L]
        return (ba * factor).t().contiguous()

    def delta_weight(self, in_features: int, convention: str) -> torch.Tensor:
        """The dense weight update float64 ``[K, N]`` (GPTQ orientation)."""
        return self.delta_blocks(in_features, convention).repeat_interleave(self.pool, dim=0)


@dataclass
class QALoraAdapter:
    """A parsed, validated QA-LoRA adapter: its config and per-module factors keyed by base module name."""

    config: dict[str, Any]
    modules: dict[str, QALoraModule]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # Same matching rule as peft.utils.other.get_pattern_key: the key matches a suffix of the name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(cfg: dict[str, Any], convention: str, where: str) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{where}: peft_type is {peft_type!r}; only LoRA/QA-LoRA adapters can be merged")
    for key in _UNSUPPORTED_TRUTHY:
        if cfg.get(key):
            raise CheckpointError(f"{where}: unsupported option {key}={cfg[key]!r}; cannot merge into zero-points")
    if str(cfg.get("bias", "none")) != "none":
        raise CheckpointError(f"{where}: unsupported option bias={cfg['bias']!r} (only 'none' can be merged)")
    if not cfg.get("use_qalora") and convention == "peft":
        raise CheckpointError(
            f"{where}: use_qalora is not true: this is a plain LoRA adapter. Its update varies inside every "
            "quantization group, so it cannot be merged exactly into a quantized model's zero-points; "
            "train with LoraConfig(use_qalora=True, qalora_group_size=L) where L is a multiple of the "
            "base model's group size (or use --convention qalora for original QA-LoRA adapters)"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {cfg.get(key)!r}")


def read_qalora_adapter(adapter_dir: str | os.PathLike, convention: str = "peft") -> QALoraAdapter:
    """Parse and validate a PEFT QA-LoRA adapter directory.

    With ``convention="qalora"`` (original QA-LoRA code, whose configs predate
    ``use_qalora``), a missing ``qalora_group_size`` is inferred per module from
    ``A``'s shape when the base layer is known (see :func:`pool_size_for`).
    """
    if convention not in CONVENTIONS:
        raise CheckpointError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    src = require_dir(adapter_dir, "adapter")
    cfg_file = src / ADAPTER_CONFIG
    cfg = read_json(cfg_file, ADAPTER_CONFIG)
    _check_config(cfg, convention, cfg_file.name)
    weights = src / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if pickled:
            raise CheckpointError(
                f"{src} has no {ADAPTER_WEIGHTS}, only pickle weights ({', '.join(pickled)}); pickle files "
                "can execute code when loaded and are refused. Re-save with safe_serialization=True."
            )
        raise CheckpointError(f"adapter weights not found: {weights}")
    pool = cfg.get("qalora_group_size") if cfg.get("use_qalora") else None
    if pool is not None and (not isinstance(pool, int) or pool <= 0):
        raise CheckpointError(f"{cfg_file.name}: qalora_group_size must be a positive integer, got {pool!r}")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names: set[str] = set()
    for name, t in iter_tensors([weights]):
        m = _TENSOR_RE.match(name)
        if m is None:
            raise CheckpointError(
                f"{weights.name}: unexpected tensor {name}; only lora_A/lora_B weights of linear layers can be merged"
            )
        if m["adapter"]:
            adapter_names.add(m["adapter"])
        factors.setdefault(m["module"], {})[m["ab"]] = t
    if len(adapter_names) > 1:
        raise CheckpointError(f"{weights.name} holds several adapters ({sorted(adapter_names)}); save one at a time")
    if not factors:
        raise CheckpointError(f"{weights.name} holds no lora_A/lora_B tensors")
    modules: dict[str, QALoraModule] = {}
    for module, ab in sorted(factors.items()):
        for key in ("A", "B"):
            if key not in ab:
                raise CheckpointError(f"{weights.name}: {module} has no lora_{key} weight")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise CheckpointError(
                f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not [r, K/L] and [N, r]"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise CheckpointError(f"{module}: lora_A/lora_B must be float tensors, got {a.dtype} and {b.dtype}")
        if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CheckpointError(f"{module}: lora_A/lora_B contain NaN or infinite values")
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
        if a.shape[0] != r:
            raise CheckpointError(f"{module}: lora_A has rank {a.shape[0]} but the adapter config says r={r}")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[module] = QALoraModule(module, a, b, int(pool or 0), scaling)
    logger.info("read QA-LoRA adapter with %d modules from %s", len(modules), src)
    return QALoraAdapter(cfg, modules)


def pool_size_for(mod: QALoraModule, in_features: int, out_features: int) -> int:
    """Check ``mod``'s shapes against a base layer ``[K, N]`` and return its pooling size L.

    ``L`` comes from the config (``qalora_group_size``); when the config has none
    (original QA-LoRA adapters) it is ``K / A.shape[1]``.
    """
    a_cols = mod.lora_a.shape[1]
    if mod.lora_b.shape[0] != out_features:
        raise CheckpointError(
            f"{mod.name}: lora_B has {mod.lora_b.shape[0]} rows but the base layer has {out_features} outputs"
        )
    pool = mod.pool
    if pool == 0:
        if a_cols == 0 or in_features % a_cols != 0:
            raise CheckpointError(f"{mod.name}: lora_A has {a_cols} inputs, which does not divide K={in_features}")
        pool = in_features // a_cols
        if pool == 1:
            raise CheckpointError(
                f"{mod.name}: lora_A takes all {in_features} inputs (no pooling): this is plain LoRA, which "
                "cannot be merged exactly into a quantized model's zero-points"
            )
    if in_features % pool != 0 or a_cols != in_features // pool:
        raise CheckpointError(
            f"{mod.name}: lora_A has shape {list(mod.lora_a.shape)}, expected [r, {in_features} / {pool}] "
            f"for a base layer with K={in_features} and qalora_group_size={pool}"
        )
    return pool
