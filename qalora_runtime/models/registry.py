"""Maps a checkpoint's ``architectures`` entry to the model class that runs it."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import DecoderConfig
from .llama import DecoderForCausalLM

#: Architectures served by :class:`DecoderForCausalLM` (they differ only in config).
SUPPORTED_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "MistralForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
}

_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def resolve_architecture(config: dict[str, Any]) -> str:
    """The supported architecture named by ``config`` (``architectures`` or ``model_type``)."""
    archs = config.get("architectures") or []
    if not archs and config.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[config["model_type"]]]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    named = ", ".join(archs) if archs else f"model_type={config.get('model_type')!r}"
    raise ValueError(
        f"unsupported model architecture {named}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def build_model(config: dict[str, Any]) -> tuple[DecoderForCausalLM, DecoderConfig]:
    """The meta-device skeleton for ``config`` (load weights with ``load_weights``)."""
    arch = resolve_architecture(config)
    cfg = DecoderConfig.from_dict(config, arch)
    return SUPPORTED_ARCHITECTURES[arch](cfg), cfg
