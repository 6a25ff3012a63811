"""Llama-family decoder (Llama 1/2/3, SmolLM, TinyLlama, Mistral, Qwen2) on packed linear layers.

The module tree mirrors transformers' parameter names (``model.layers.{i}.input_layernorm``
...), except that q/k/v and gate/up are fused into ``qkv_proj`` and
``gate_up_proj`` (concatenated along the output dim, exact for same-spec parts).
The skeleton is built on the meta device; :meth:`DecoderForCausalLM.load_weights`
then swaps in packed layers and real norm/embedding tensors read straight
from the checkpoint, so no full-precision copy of a quantized weight ever exists.

The forward works on flattened tokens ``[T]`` of a whole step (prefill chunks
and decode tokens mixed); attention metadata and the paged KV cache come from
the model runner. Mistral and Qwen2 differ from Llama only in config (sliding
window, q/k/v bias), which :class:`~.config.DecoderConfig` resolves.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..formats.checkpoint import MergedCheckpoint
from ..kernels.layer_ops import silu_mul
from ..kernels.registry import select_kernel
from ..layers.embedding import DenseEmbedding, HeadColumnEmbedding, QuantizedEmbedding
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..quant.linear import DenseLinear, PackedLinear, load_linear
from ..worker.attention import AttentionMetadata, paged_attention, write_kv
from .config import DecoderConfig

logger = logging.getLogger(__name__)


def _placeholder(in_features: int, out_features: int) -> nn.Module:
    # Shape-only stand-in, replaced at load; it never holds data.
    return nn.Linear(in_features, out_features, bias=False, device="meta")


class Attention(nn.Module):
    """Fused-qkv self-attention with RoPE and paged KV (GQA when kv_heads < heads)."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.qk_heads = cfg.num_heads + cfg.num_kv_heads
        self.scale = cfg.head_dim ** -0.5
        self.window = cfg.layer_windows[layer_idx]
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = _placeholder(cfg.hidden_size, qkv_out)
        self.o_proj = _placeholder(self.q_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, positions: torch.Tensor,
                meta: AttentionMetadata, cache: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        t = qkv.shape[0]
        # q and k are adjacent columns: rotate both in one call, in place.
        rotary.rotate_(qkv, self.qk_heads, positions)
        write_kv(cache, meta.slot_mapping, qkv[:, self.q_size:].view(t, 2, self.num_kv_heads, self.head_dim))
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
        return self.o_proj(paged_attention(q, cache, meta, self.scale))


class MLP(nn.Module):
    """SwiGLU feed-forward with gate and up fused into one projection."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = _placeholder(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = _placeholder(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: attention and MLP, each with a residual.

    The residual stream is carried separately from the block output (as vLLM
    does) so each residual add fuses into the norm that follows it:
    ``forward(x, residual)`` returns ``(mlp_out, residual)`` where the layer's
    true output is ``mlp_out + residual``. ``residual`` is None for the first
    layer (``x`` is then the embedding) and is updated in place.
    """

    def __init__(self, cfg: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device="meta")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device="meta")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rotary: RotaryEmbedding,
                positions: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.self_attn(h, rotary, positions, meta, cache)
        h = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (transformers' ``model.`` prefix)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens: nn.Module = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta")
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device="meta")


class DecoderForCausalLM(nn.Module):
    """A Llama-family causal LM over a paged KV cache.

    ``forward(input_ids[T], positions[T], attn, kv_caches, logits_indices)``
    returns logits ``[len(logits_indices), vocab]`` in the compute dtype; ``attn``
    maps each distinct layer window (None = full attention) to that step's
    :class:`AttentionMetadata`.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head: nn.Module = _placeholder(cfg.hidden_size, cfg.vocab_size)
        self.rotary: RotaryEmbedding | None = None
        self.dtype: torch.dtype | None = None
        self.logits_dtype: torch.dtype = torch.float32
        self.windows: tuple[int | None, ...] = tuple(sorted(set(cfg.layer_windows), key=lambda w: w or 0))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: dict[int | None, AttentionMetadata], kv_caches: list[torch.Tensor],
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        if self.rotary is None:
            raise RuntimeError("load_weights() was not called")
        x = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer, cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, self.rotary, positions, attn[layer.self_attn.window], cache)
        if logits_indices is not None:
            if logits_indices.numel() == 0:  # e.g. only non-final prefill chunks this step
                return x.new_empty(0, self.config.vocab_size)
            # norm is per row: select first, skip the rest
            x = x.index_select(0, logits_indices)
            residual = residual.index_select(0, logits_indices) if residual is not None else None
        x = self.model.norm(x, residual) if residual is not None else self.model.norm(x)
        return self.compute_logits(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head over final-normed hidden states ``[rows, hidden]`` (in :attr:`logits_dtype`)."""
        if hidden.dtype != self.logits_dtype:
            hidden = hidden.to(self.logits_dtype)
        return self.lm_head(hidden)

    # -- loading ----------------------------------------------------------
    def load_weights(self, ckpt: MergedCheckpoint, dtype: torch.dtype, device: torch.device | str) -> None:
        """Replace every meta tensor with checkpoint data (packed layers stay packed)."""
        device = torch.device(device)
        cfg = self.config
        for i, layer in enumerate(self.model.layers):
            p = f"model.layers.{i}"
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj = load_linear(ckpt, [f"{p}.self_attn.{n}_proj" for n in "qkv"], dtype, device)
            attn.o_proj = load_linear(ckpt, [f"{p}.self_attn.o_proj"], dtype, device)
            mlp.gate_up_proj = load_linear(ckpt, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], dtype, device)
            mlp.down_proj = load_linear(ckpt, [f"{p}.mlp.down_proj"], dtype, device)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                _set_norm(getattr(layer, norm), ckpt, f"{p}.{norm}.weight", dtype, device)
        _set_norm(self.model.norm, ckpt, "model.norm.weight", dtype, device)
        self._load_embeddings(ckpt, dtype, device)
        self.rotary = RotaryEmbedding(cfg.rope, dtype, device,
                                      initial_positions=min(cfg.max_position_embeddings, 4096))
        self.dtype = dtype
        leftovers = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if leftovers:
            raise ValueError(f"checkpoint left tensors unloaded: {leftovers[:5]}")

    def _load_embeddings(self, ckpt: MergedCheckpoint, dtype: torch.dtype, device: torch.device) -> None:
        name = "model.embed_tokens"
        has_head = ckpt.is_quantized("lm_head") or ckpt.has("lm_head.weight")
        if not has_head and not self.config.tie_word_embeddings:
            raise ValueError("checkpoint has no lm_head and tie_word_embeddings is false")
        head_name = "lm_head" if has_head else name
        head_dtype = _logits_dtype(ckpt, head_name, dtype, device)
        self.logits_dtype = head_dtype
        if has_head:
            self.lm_head = load_linear(ckpt, ["lm_head"], head_dtype, device)
        if ckpt.is_quantized(name):
            qw = ckpt.quantized(name)
            tensors = {"qweight": qw.qweight.to(device), "scales": qw.scales.to(device),
                       "zeros": qw.zeros.to(device)}
            if not has_head:
                # A quantized tied embedding serves as a packed lm_head.
                head = PackedLinear.from_quantized([qw], head_dtype, device)
                self.lm_head = head
                if head.kernel.supports_columns:  # lookups read the head's own layout: one copy
                    self.model.embed_tokens = HeadColumnEmbedding(head, dtype)
                    return
                # Share the GPTQ tensors when the kernel kept them as they are (no second copy).
                for key in tensors:
                    kept = head.packed_weights.get(key)
                    if kept is not None and kept.shape == tensors[key].shape:
                        tensors[key] = kept
            self.model.embed_tokens = QuantizedEmbedding(tensors["qweight"], tensors["scales"],
                                                         tensors["zeros"], qw.spec, dtype)
        else:
            weight = ckpt.tensor(f"{name}.weight").to(device=device, dtype=dtype)
            emb = DenseEmbedding(weight)
            self.model.embed_tokens = emb
            if not has_head:
                self.lm_head = DenseLinear(emb.weight.data)  # tied: same storage, two uses


def _logits_dtype(ckpt: MergedCheckpoint, head: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 logits from a packed head when a fused kernel runs it in fp32, else the compute dtype.

    bf16 logits of magnitude 16-32 are rounded to steps of 0.125, so greedy decoding
    ties and flips on rounding alone. A packed lm_head streams the same bytes either
    way and the fused CPU kernel measured the same time in fp32 as in bf16 (1.7 ms
    for SmolLM2's 8-bit 576x49152 head), so logits cost nothing to keep exact. A
    dense head stays in the compute dtype (an fp32 copy would double its memory).
    """
    if dtype == torch.float32 or not ckpt.is_quantized(head):
        return dtype
    spec = ckpt.quantized_modules[head]
    k = ckpt.shape(f"{head}.qweight")[0] * 32 // spec.bits
    n = ckpt.shape(f"{head}.qweight")[1]
    try:
        kernel = select_kernel(spec, k, n, device, torch.float32)
    except ValueError:
        return dtype
    return torch.float32 if kernel.name != "dequant_fallback" else dtype


def _set_norm(norm: RMSNorm, ckpt: MergedCheckpoint, name: str, dtype: torch.dtype,
              device: torch.device) -> None:
    norm.weight = nn.Parameter(ckpt.tensor(name).to(device=device, dtype=dtype), requires_grad=False)
