"""Decode steps through the C++ ``FusedDecoder``: every decoder layer in one native call.

With each op of a layer fused, a decode token on CPU still spent about a third
of its time crossing between Python and C++ (~15 calls per layer). For steps
in which every sequence computes exactly one token, :class:`FusedDecodeStack`
hands the embeddings to ``FusedDecoder`` (``kernels/csrc/qalora_decode.cpp``),
which runs all layers with the same kernels and ops as the Python path and
returns the final-normed hidden states; the lm_head stays in Python. It is
built only when every projection runs on the ``cpu_fused`` kernel and the KV
cache is a plain contiguous CPU tensor per layer; otherwise (GPU, other
kernels, no compiler) the Python path runs as before. ``QALORA_FUSED_DECODE=0``
turns it off (for debugging and A/B timing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from ..kernels.cpu_fused import CpuFusedKernel, choose_mode, layout_of
from ..kernels.cpu_fused_build import load_extension
from ..quant.linear import PackedLinear
from .llama import DecoderForCausalLM

logger = logging.getLogger(__name__)

FUSED_DECODE_ENV = "QALORA_FUSED_DECODE"


def _native(layer: torch.nn.Module):
    if not isinstance(layer, PackedLinear) or not isinstance(layer.kernel, CpuFusedKernel):
        return None
    return CpuFusedKernel.native_weights(layer.packed_weights, layer.spec, layer.bias)


class FusedDecodeStack:
    """All decoder layers of ``model`` over ``kv_caches`` for decode-only steps (one token per row)."""

    def __init__(self, native, model: DecoderForCausalLM) -> None:
        self._native = native
        self._model = model
        # One GEMV/GEMM choice per step for all layers: the MLP input projection's
        # layout decides it (a mixed-layout stack stays correct, only the choice may not be optimal).
        self._layout = layout_of(model.model.layers[0].mlp.gate_up_proj.packed_weights)

    @classmethod
    def build(cls, model: DecoderForCausalLM, kv_caches: Sequence[torch.Tensor]) -> FusedDecodeStack | None:
        """The stack for this model and cache, or None (with the reason logged) when it cannot run."""
        reason = cls._unsupported(model, kv_caches)
        if reason:
            logger.info("fused decode off: %s", reason)
            return None
        cfg = model.config
        ext = load_extension()
        stack = ext.FusedDecoder(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                 cfg.intermediate_size, model.model.norm.eps, cfg.head_dim ** -0.5,
                                 model.model.norm.weight.data)
        for layer, cache in zip(model.model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            stack.add_layer(layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data,
                            _native(attn.qkv_proj), _native(attn.o_proj), _native(mlp.gate_up_proj),
                            _native(mlp.down_proj), attn.window or 0, cache)
        return cls(stack, model)

    @staticmethod
    def _unsupported(model: DecoderForCausalLM, kv_caches: Sequence[torch.Tensor]) -> str | None:
        if os.environ.get(FUSED_DECODE_ENV, "1") == "0":
            return f"{FUSED_DECODE_ENV}=0"
        ext = load_extension()
        if ext is None or not ext.has_avx2():
            return "C++ extension unavailable or CPU lacks AVX2"
        if model.dtype not in (torch.float32, torch.bfloat16):
            return f"dtype {model.dtype}"
        if len(kv_caches) != len(model.model.layers):
            return "one KV cache tensor per layer expected"
        for i, (layer, cache) in enumerate(zip(model.model.layers, kv_caches)):
            if cache.device.type != "cpu" or not cache.is_contiguous() or cache.dtype != model.dtype:
                return f"layer {i}: KV cache is not a contiguous CPU tensor of the model dtype"
            projections = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj)
            if any(_native(p) is None for p in projections):
                return f"layer {i}: a projection does not run on the cpu_fused kernel"
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(n.dtype != model.dtype for n in norms):
                return f"layer {i}: norm weights are not in the model dtype"
        return None

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[B, hidden]`` for one new token per sequence."""
        model = self._model
        x = model.model.embed_tokens(input_ids).contiguous()
        rotary = model.rotary
        return self._native.forward(x, positions, slots, block_tables, seq_lens, rotary.cos_table,
                                    rotary.sin_table, choose_mode(x.shape[0], self._layout, x.dtype))
