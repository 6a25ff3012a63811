"""Quantize a float Hugging Face checkpoint (safetensors) into the merged format v1 with RTN.

Llama-family tensor names: every 2-D ``*.weight`` under ``model.layers.`` is an
``nn.Linear`` weight ``[N, K]`` and is quantized with the requested bits/group
size. The embedding (``model.embed_tokens``) and an untied ``lm_head`` are kept
16-bit or quantized to 8-bit with group 32. An 8-bit embedding is stored in
*linear* orientation (in = hidden, out = vocab), exactly like ``lm_head``, so
the runtime can gather rows from the same packed layout it uses for the head.
Everything else (norms, biases, rotary buffers) is copied unchanged.

Quantization is round-to-nearest (:func:`quantize_rtn`), not GPTQ: no
calibration data is used. Expect a larger quality loss than GPTQ at 2-3 bits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..quant.quantize import quantize_rtn
from ..quant.spec import SUPPORTED_BITS, QuantSpec
from .checkpoint import CheckpointError, QuantizationConfig
from .hf_files import InMemoryCheckpoint, check_output_dir, read_json, require_dir, safetensors_files

logger = logging.getLogger(__name__)

EMBED = "model.embed_tokens"
LM_HEAD = "lm_head"
LAYER_PREFIX = "model.layers."
HIGH_PRECISION_BITS = (8, 16)
EIGHT_BIT_GROUP = 32
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def _sixteen_bit(t: torch.Tensor) -> torch.Tensor:
    """Keep fp16/bf16 as is; fp32 goes to bf16 (fp16's range is too small for some embeddings)."""
    return t if t.dtype in (torch.float16, torch.bfloat16) else t.to(torch.bfloat16)


def _check_options(bits: int, group_size: int, embed_bits: int, lm_head_bits: int | None) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if embed_bits not in HIGH_PRECISION_BITS:
        raise ValueError(f"embed_bits must be one of {HIGH_PRECISION_BITS}, got {embed_bits}")
    if lm_head_bits is not None and lm_head_bits not in HIGH_PRECISION_BITS:
        raise ValueError(f"lm_head_bits must be one of {HIGH_PRECISION_BITS} or None, got {lm_head_bits}")


def quantize_model_in_memory(
    src_dir: str | os.PathLike,
    bits: int,
    group_size: int,
    embed_bits: int = 16,
    lm_head_bits: int | None = None,
) -> InMemoryCheckpoint:
    """Quantize ``src_dir`` and return the merged checkpoint in memory (nothing written).

    ``lm_head_bits=None`` means "same as ``embed_bits``".
    """
    _check_options(bits, group_size, embed_bits, lm_head_bits)
    head_bits = embed_bits if lm_head_bits is None else lm_head_bits
    src = require_dir(src_dir, "model")
    model_config = read_json(src / "config.json", "config.json")
    if "quantization_config" in model_config:
        method = (model_config["quantization_config"] or {}).get("quant_method")
        raise CheckpointError(
            f"{src} is already quantized (quant_method={method!r}); `qalora quantize` needs a float "
            "checkpoint (use `qalora convert` for GPTQ/GGUF)"
        )
    files = safetensors_files(src)
    main_spec = QuantSpec(bits, group_size)
    out: dict[str, torch.Tensor] = {}
    overrides: dict[str, dict[str, int]] = {}
    not_quantized: list[str] = []
    names = _tensor_names(files)
    if not any(n.startswith(LAYER_PREFIX) for n, _ in names):
        raise CheckpointError(f"{src} has no tensors under '{LAYER_PREFIX}': not a Llama-family checkpoint")
    for name, file in tqdm(names, desc="quantize", unit="tensor", disable=None):
        with safe_open(str(file), framework="pt") as f:
            t = f.get_tensor(name)
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and t.dim() == 2 and t.is_floating_point():
            if name.startswith(LAYER_PREFIX):
                _quantize_into(out, module, t, main_spec)
                continue
            if module in (EMBED, LM_HEAD):
                want = embed_bits if module == EMBED else head_bits
                if want == 8:
                    spec = QuantSpec(8, EIGHT_BIT_GROUP)
                    _quantize_into(out, module, t, spec)
                    overrides[module] = {"bits": spec.bits, "group_size": spec.group_size}
                else:
                    out[name] = _sixteen_bit(t)
                    not_quantized.append(module)
                continue
            not_quantized.append(module)
        out[name] = t
    if LM_HEAD + ".weight" not in {n for n, _ in names} and lm_head_bits is not None and lm_head_bits != embed_bits:
        logger.warning("lm_head is tied to the embedding: --lm-head-bits is ignored, it follows --embed-bits")
    qcfg = QuantizationConfig(
        bits=bits,
        group_size=group_size,
        module_overrides=overrides,
        modules_not_quantized=tuple(sorted(not_quantized)),
        source=f"rtn bits={bits} group_size={group_size}",
    )
    return InMemoryCheckpoint(model_config, qcfg, out, aux_dir=src)


def _tensor_names(files: list[Path]) -> list[tuple[str, Path]]:
    names: list[tuple[str, Path]] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                names.extend((n, file) for n in f.keys())
        except SafetensorError as e:
            raise CheckpointError(f"{file.name} is not a valid safetensors file (truncated or corrupt?): {e}") from None
    return sorted(names)


def _quantize_into(out: dict[str, torch.Tensor], module: str, weight: torch.Tensor, spec: QuantSpec) -> None:
    try:
        qweight, scales, zeros = quantize_rtn(weight, spec, input_dim=1, name=module)
    except ValueError as e:
        raise CheckpointError(
            f"cannot quantize {list(weight.shape)} weight to {spec.bits}-bit group {spec.group_size}: {e}"
        ) from None
    out[f"{module}.qweight"] = qweight
    out[f"{module}.scales"] = scales
    out[f"{module}.zeros"] = zeros


def quantize_model(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    bits: int,
    group_size: int,
    embed_bits: int = 16,
    lm_head_bits: int | None = None,
) -> Path:
    """Quantize a float HF checkpoint into a merged-format directory (written atomically)."""
    check_output_dir(out_dir)
    ckpt = quantize_model_in_memory(src_dir, bits, group_size, embed_bits, lm_head_bits)
    path = ckpt.save(out_dir)
    logger.info("wrote %d-bit g%d RTN checkpoint to %s", bits, group_size, path)
    return path
