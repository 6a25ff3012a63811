"""The subset of an HF ``config.json`` a Llama-family model needs, parsed and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..layers.rotary import RopeConfig


@dataclass(frozen=True)
class DecoderConfig:
    """Shapes and options of a Llama/Mistral/Qwen2-style decoder-only transformer.

    ``layer_windows[i]`` is the sliding attention window of layer ``i`` (None
    for full attention), following transformers' rules: Mistral applies
    ``sliding_window`` to every layer; Qwen2 only with ``use_sliding_window``
    and from ``max_window_layers`` on (or as ``layer_types`` says).
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    rope: RopeConfig
    layer_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dict(cls, config: dict[str, Any], architecture: str) -> DecoderConfig:
        """Parse ``config`` (an HF config.json dict); ValueError on anything unsupported."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
            vocab = int(config["vocab_size"])
            inter = int(config["intermediate_size"])
        except KeyError as e:
            raise ValueError(f"config.json is missing {e}") from None
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        model_type = str(config.get("model_type", "llama"))
        is_qwen2 = model_type == "qwen2" or architecture.startswith("Qwen2")
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 has q/k/v bias but no o_proj bias; Llama's attention_bias covers all four.
            attention_bias=is_qwen2 or bool(config.get("attention_bias", False)),
            o_proj_bias=(not is_qwen2) and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            rope=RopeConfig.from_model_config(config, head_dim),
            layer_windows=_layer_windows(config, model_type, architecture, layers),
            eos_token_ids=_eos_ids(config.get("eos_token_id")),
        )


def _layer_windows(config: dict[str, Any], model_type: str, architecture: str,
                   layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if model_type == "qwen2" or architecture.startswith("Qwen2"):
        if not config.get("use_sliding_window", False) or not window:
            return (None,) * layers
        types = config.get("layer_types")
        if types:
            return tuple(int(window) if t == "sliding_attention" else None for t in types)
        start = int(config.get("max_window_layers", layers))
        return tuple(int(window) if i >= start else None for i in range(layers))
    if model_type == "mistral" or architecture.startswith("Mistral"):
        return (int(window) if window else None,) * layers
    return (None,) * layers


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
