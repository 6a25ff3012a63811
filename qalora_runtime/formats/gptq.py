"""Import AutoGPTQ / GPTQModel checkpoints into the merged format v1.

A GPTQ linear ``P`` stores ``P.qweight`` (int32 ``[K*bits/32, N]``, packed along
K), ``P.qzeros`` (int32 ``[K/G, N*bits/32]``, packed along N with the same bit
stream), ``P.scales`` (fp16 ``[K/G, N]``), ``P.g_idx`` (``[K]``) and maybe
``P.bias``. Dequantization is ``W = scales * (q - z)`` where the integer zero
``z`` depends on ``checkpoint_format``:

* ``gptq`` (v1, AutoGPTQ and the default on disk): the stored field is ``z - 1``;
  the GPTQ kernels add 1 after unpacking, *without* wrapping, so a field of
  ``2**bits - 1`` means ``z = 2**bits``. We do the same (float zeros hold it).
* ``gptq_v2`` (GPTQModel): the stored field is ``z``.

``qweight`` is copied byte for byte (our packing is GPTQ's); zeros become float.
A non-trivial ``g_idx`` (act-order / desc_act reordering) is refused: the
merged format has no row permutation and loading it without one is wrong.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from ..quant.packing import unpack_int32
from ..quant.spec import SUPPORTED_BITS, QuantSpec
from .checkpoint import CheckpointError, QuantizationConfig, QuantizedWeight
from .hf_files import InMemoryCheckpoint, check_output_dir, load_tensors, read_json, require_dir, safetensors_files

logger = logging.getLogger(__name__)

GPTQ_FORMATS = ("gptq", "gptq_v2")
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class GPTQConfig:
    """The quantization settings of a GPTQ checkpoint (``group_size == -1``: one group per layer)."""

    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"

    def group_for(self, in_features: int) -> int:
        """The effective group size G for a layer with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "GPTQConfig":
        """Parse a ``quantize_config.json`` / ``quantization_config`` block."""
        method = d.get("quant_method", "gptq")
        if str(method).lower() != "gptq":
            raise CheckpointError(f"{where}: quant_method is {method!r}, not a GPTQ checkpoint")
        fmt = str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()
        if fmt not in GPTQ_FORMATS:
            raise CheckpointError(
                f"{where}: checkpoint_format {fmt!r} is not supported (supported: {', '.join(GPTQ_FORMATS)}); "
                "re-save the model in the gptq or gptq_v2 format"
            )
        try:
            bits, group_size = int(d["bits"]), int(d.get("group_size", d.get("groupsize", -1)))
        except KeyError as e:
            raise CheckpointError(f"{where}: missing key {e}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: bad bits/group_size: {e}") from None
        if bits not in SUPPORTED_BITS:
            raise CheckpointError(f"{where}: unsupported bits={bits}; supported: {SUPPORTED_BITS}")
        if group_size != -1 and group_size <= 0:
            raise CheckpointError(f"{where}: group_size must be positive or -1, got {group_size}")
        return cls(bits, group_size, bool(d.get("sym", True)), bool(d.get("desc_act", False)), fmt)


def read_gptq_config(src: Path) -> tuple[GPTQConfig, dict[str, Any]]:
    """Return the GPTQ settings and the model config (minus its GPTQ quantization_config)."""
    model_config = read_json(src / "config.json", "config.json")
    qc_file = src / "quantize_config.json"
    if qc_file.is_file():
        cfg = GPTQConfig.from_dict(read_json(qc_file, "quantize_config.json"), qc_file.name)
    elif isinstance(model_config.get("quantization_config"), dict):
        cfg = GPTQConfig.from_dict(model_config["quantization_config"], "config.json quantization_config")
    else:
        raise CheckpointError(
            f"{src} is not a GPTQ checkpoint: no quantize_config.json and no quantization_config in config.json"
        )
    model_config = {k: v for k, v in model_config.items() if k != "quantization_config"}
    return cfg, model_config


def gptq_zeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """Unpack GPTQ ``qzeros`` (packed along N) into the float zero-points ``z`` ``[K/G, N]``."""
    fields = unpack_int32(qzeros, bits, dim=1).to(torch.float32)
    # v1 stores z - 1; the kernels add 1 back after masking, with no wrap-around.
    return fields + 1.0 if checkpoint_format == "gptq" else fields


def read_gptq_layer(
    name: str,
    tensors: Mapping[str, torch.Tensor],
    cfg: GPTQConfig,
) -> QuantizedWeight:
    """Validate and convert one GPTQ linear ``name`` from ``tensors`` into a QuantizedWeight.

    ``tensors`` maps full tensor names (``{name}.qweight`` ...) to tensors; ``g_idx``
    may be absent (then the trivial ``k // G`` is assumed, as old AutoGPTQ did).
    """
    for suffix in ("qweight", "qzeros", "scales"):
        if f"{name}.{suffix}" not in tensors:
            raise CheckpointError(f"GPTQ layer {name} is missing tensor {name}.{suffix}")
    qweight, qzeros, scales = (tensors[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales"))
    bits = cfg.bits
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise CheckpointError(f"{name}.qweight must be a 2-D int32 tensor, got {qweight.dtype} {list(qweight.shape)}")
    if qweight.shape[0] % bits != 0:
        raise CheckpointError(f"{name}.qweight has {qweight.shape[0]} rows, not a multiple of bits={bits}")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    g = cfg.group_for(k)
    if k % g != 0:
        raise CheckpointError(f"{name}: group_size {g} does not divide in_features {k}")
    groups = k // g
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32) or tuple(scales.shape) != (groups, n):
        raise CheckpointError(
            f"{name}.scales must be a float [{groups}, {n}] tensor, got {scales.dtype} {list(scales.shape)}"
        )
    if n * bits % 32 != 0:
        raise CheckpointError(f"{name}: out_features {n} cannot hold {bits}-bit packed qzeros")
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (groups, n * bits // 32):
        raise CheckpointError(
            f"{name}.qzeros must be an int32 [{groups}, {n * bits // 32}] tensor, got {qzeros.dtype} {list(qzeros.shape)}"
        )
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is not None:
        trivial = torch.arange(k, dtype=torch.int64) // g
        if tuple(g_idx.shape) != (k,):
            raise CheckpointError(f"{name}.g_idx has shape {list(g_idx.shape)}, expected [{k}]")
        if not torch.equal(g_idx.to(torch.int64), trivial):
            raise CheckpointError(
                f"{name}.g_idx is not the trivial k // group_size: this checkpoint was quantized with "
                "act-order (desc_act=True) and reorders input rows across groups. The merged format has "
                "no row permutation, so it cannot be imported without changing the model; re-quantize "
                "with desc_act=False (or static_groups=True)."
            )
    zeros = gptq_zeros(qzeros, bits, cfg.checkpoint_format)
    _check_sym(name, zeros, cfg)
    bias = tensors.get(f"{name}.bias")
    if bias is not None and tuple(bias.shape) != (n,):
        raise CheckpointError(f"{name}.bias has shape {list(bias.shape)}, expected [{n}]")
    return QuantizedWeight(qweight=qweight, scales=scales, zeros=zeros, spec=QuantSpec(bits, g), bias=bias)


def _check_sym(name: str, zeros: torch.Tensor, cfg: GPTQConfig) -> None:
    """Catch a mislabelled checkpoint_format: symmetric GPTQ always has z = 2**(bits-1)."""
    if not cfg.sym:
        return
    mid = float(1 << (cfg.bits - 1))
    if bool((zeros == mid).all()):
        return
    shift = -1.0 if cfg.checkpoint_format == "gptq" else 1.0
    if bool((zeros + shift == mid).all()):
        other = "gptq_v2" if cfg.checkpoint_format == "gptq" else "gptq"
        raise CheckpointError(
            f"{name}: sym=True but every zero-point is {mid + shift:g} instead of {mid:g} under "
            f"checkpoint_format={cfg.checkpoint_format!r}; the file looks like {other!r}. "
            "Fix checkpoint_format in the quantization config."
        )
    logger.warning("%s: sym=True but zero-points are not all %g; using them as stored", name, mid)


def _gptq_modules(names: list[str]) -> list[str]:
    return sorted({n[: -len(".qweight")] for n in names if n.endswith(".qweight")})


def load_gptq(src_dir: str | os.PathLike, progress: bool = True) -> InMemoryCheckpoint:
    """Read a GPTQ directory into an in-memory merged checkpoint (nothing written)."""
    src = require_dir(src_dir, "GPTQ checkpoint")
    cfg, model_config = read_gptq_config(src)
    raw = load_tensors(safetensors_files(src))
    modules = _gptq_modules(list(raw))
    if not modules:
        raise CheckpointError(f"{src} has no GPTQ layers (no *.qweight tensors)")
    out: dict[str, torch.Tensor] = {}
    specs: dict[str, QuantSpec] = {}
    for m in tqdm(modules, desc="import GPTQ", unit="layer", disable=None if progress else True):
        qw = read_gptq_layer(m, raw, cfg)
        specs[m] = qw.spec
        out[f"{m}.qweight"] = qw.qweight
        out[f"{m}.scales"] = qw.scales
        out[f"{m}.zeros"] = qw.zeros
        if qw.bias is not None:
            out[f"{m}.bias"] = qw.bias
    consumed = {f"{m}.{s}" for m in modules for s in (*GPTQ_SUFFIXES, "bias")}
    not_quantized: list[str] = []
    for name, t in raw.items():
        if name in consumed:
            continue
        out[name] = t
        if t.dim() == 2 and name.endswith(".weight"):
            not_quantized.append(name[: -len(".weight")])
    # group_size -1 makes G = K per layer: the most common K is the default, others are overrides.
    default_g = Counter(s.group_size for s in specs.values()).most_common(1)[0][0]
    overrides = {m: {"bits": s.bits, "group_size": s.group_size} for m, s in specs.items() if s.group_size != default_g}
    qcfg = QuantizationConfig(
        bits=cfg.bits,
        group_size=default_g,
        module_overrides=overrides,
        modules_not_quantized=tuple(sorted(not_quantized)),
        source=f"gptq checkpoint_format={cfg.checkpoint_format} sym={cfg.sym}",
    )
    logger.info("read %d GPTQ layers (%d-bit, %s) from %s", len(modules), cfg.bits, cfg.checkpoint_format, src)
    return InMemoryCheckpoint(model_config, qcfg, out, aux_dir=src)


def is_gptq_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a GPTQ checkpoint directory (by its config files)."""
    p = Path(path)
    if (p / "quantize_config.json").is_file():
        return True
    try:
        qc = read_json(p / "config.json", "config.json").get("quantization_config")
    except CheckpointError:
        return False
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq"


def convert_gptq(src_dir: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Convert a GPTQ checkpoint directory into a merged-format directory ``out_dir``.

    Written atomically: on any error ``out_dir`` is not created.
    """
    check_output_dir(out_dir)  # fail before the (slow) read, not after
    ckpt = load_gptq(src_dir, progress)
    path = ckpt.save(out_dir)
    logger.info("wrote merged checkpoint to %s", path)
    return path
