"""Tiny random Llama / Mistral / Qwen2 models: our runtime vs transformers on the same weights.

Each test builds a small random transformers model from a config, quantizes its
linear layers with RTN into our merged format, and loads the *dequantized*
weights back into the transformers model as the reference. Logits are compared
in fp32 over a chunked prefill and several decode steps through the paged KV
cache, so rope variants, GQA, biases, sliding windows, tied/quantized
embeddings and the attention metadata are all checked against an independent
implementation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from qalora_runtime.formats.checkpoint import QuantizationConfig, save_checkpoint
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.models.loader import load_model
from qalora_runtime.quant.linear import PackedLinear
from qalora_runtime.quant.quantize import quantize_rtn
from qalora_runtime.quant.spec import QuantSpec
from qalora_runtime.worker.kv_cache import KVCache
from qalora_runtime.worker.model_runner import ModelRunner, SequenceInput

BLOCK = 4  # small blocks so every sequence spans several, non-contiguous ones
VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.08,
              max_position_embeddings=128, rms_norm_eps=1e-5)

VARIANTS = {
    # name: (config class, extra config, bits, group_size, quantize the embedding (8-bit) / head)
    "llama_4bit": (transformers.LlamaConfig, {}, 4, 32, False),
    "llama_3bit": (transformers.LlamaConfig, {}, 3, 32, False),
    "llama3_rope_tied_q8_embed": (
        transformers.LlamaConfig,
        {"tie_word_embeddings": True,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
         "rope_theta": 500000.0},
        4, 32, True),
    "llama_linear_rope_tied_dense": (
        transformers.LlamaConfig,
        {"tie_word_embeddings": True, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, 4, 64, False),
    "mistral_window": (transformers.MistralConfig, {"sliding_window": 6, "head_dim": 32}, 4, 32, False),
    "qwen2_bias": (transformers.Qwen2Config, {}, 4, 64, False),
}


def _quantize(name: str, weight: torch.Tensor, spec: QuantSpec, tensors: dict) -> torch.Tensor:
    """Store ``weight`` ([N, K]) quantized under ``name``; return its dequantized [N, K] value."""
    qweight, scales, zeros = quantize_rtn(weight, spec, name=name)
    tensors[f"{name}.qweight"], tensors[f"{name}.scales"], tensors[f"{name}.zeros"] = qweight, scales, zeros
    return dequantize(qweight, scales, zeros, spec, torch.float32).t().contiguous()


def build_pair(variant: str, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """Write a quantized tiny checkpoint; return (its dir, transformers model with the dequantized weights)."""
    cls, extra, bits, group, q_embed = VARIANTS[variant]
    cfg = cls(**{**COMMON, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(hash(variant) % 1000)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    spec = QuantSpec(bits, group)
    tensors: dict[str, torch.Tensor] = {}
    state = hf.state_dict()
    overrides: dict[str, dict[str, int]] = {}
    not_quantized: list[str] = []
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, t in state.items():
        module = name.rsplit(".", 1)[0]
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith(".weight") and t.dim() == 2 and ".layers." in name:
            state[name] = _quantize(module, t, spec, tensors)
        elif name == "model.embed_tokens.weight" and q_embed:
            # Linear orientation (in = hidden, out = vocab): the table is W^T of a [hidden -> vocab] layer.
            state[name] = _quantize(module, t, QuantSpec(8, 32), tensors)
            overrides[module] = {"bits": 8, "group_size": 32}
        elif name == "lm_head.weight":
            state[name] = _quantize(module, t, spec, tensors)
        else:
            tensors[name] = t.clone()
            if t.dim() == 2:
                not_quantized.append(module)
    hf.load_state_dict(state)
    if tied:
        hf.tie_weights()
    config = cfg.to_dict()
    config["architectures"] = [cls.__name__.replace("Config", "ForCausalLM")]
    qcfg = QuantizationConfig(bits, group, overrides, tuple(not_quantized))
    out = tmp_path / variant
    save_checkpoint(out, config, qcfg, tensors)
    return out, hf


class PagedSequence:
    """Feeds one sequence through a runner with a scattered (reversed, interleaved) block table."""

    def __init__(self, tokens: list[int], first_block: int, stride: int) -> None:
        self.tokens = tokens
        nblocks = -(-len(tokens) // BLOCK)
        self.block_table = [first_block + stride * i for i in reversed(range(nblocks))]

    def item(self, start: int, end: int, sample: bool = True) -> SequenceInput:
        return SequenceInput(self.tokens[start:end], start, self.block_table, sample)


def _runner(ckpt: Path, dtype: torch.dtype = torch.float32, num_blocks: int = 96) -> ModelRunner:
    model, cfg = load_model(ckpt, dtype)
    return ModelRunner(model, KVCache.for_model(cfg, num_blocks, BLOCK, dtype), BLOCK)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant: str, tmp_path: Path) -> None:
    ckpt, hf = build_pair(variant, tmp_path)
    runner = _runner(ckpt)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (21,), generator=gen).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    seq = PagedSequence(tokens, first_block=3, stride=2)
    prompt = 13
    # Prefill in two chunks (the second one attends to the cached first one).
    assert runner.execute([seq.item(0, 7, sample=False)]).shape == (0, VOCAB)
    ours = [runner.execute([seq.item(7, prompt)])[0]]
    for pos in range(prompt, len(tokens)):  # decode steps, teacher-forced
        ours.append(runner.execute([seq.item(pos, pos + 1)])[0])
    ours_t = torch.stack(ours)
    expect = ref[prompt - 1:]
    assert _rel(ours_t, expect) < 1e-5, f"{variant}: rel diff {_rel(ours_t, expect):.2e}"
    assert torch.equal(ours_t.argmax(-1), expect.argmax(-1))


def test_mixed_batch_equals_single_sequences(tmp_path: Path) -> None:
    ckpt, _ = build_pair("mistral_window", tmp_path)  # windowed masks in every path
    gen = torch.Generator().manual_seed(2)
    lengths = {"a": 11, "b": 5, "c": 8}
    total = {k: v + 6 for k, v in lengths.items()}
    toks = {k: torch.randint(0, VOCAB, (n,), generator=gen).tolist() for k, n in total.items()}
    # Alone: prefill, then teacher-forced decodes.
    alone: dict[str, list[torch.Tensor]] = {}
    for k in toks:
        runner = _runner(ckpt)
        seq = PagedSequence(toks[k], first_block=1, stride=1)
        out = [runner.execute([seq.item(0, lengths[k])])[0]]
        out += [runner.execute([seq.item(p, p + 1)])[0] for p in range(lengths[k], total[k])]
        alone[k] = out
    # Batched: interleaved block tables, a chunked prefill of "a" alongside decodes of "b" and "c".
    runner = _runner(ckpt)
    seqs = {"a": PagedSequence(toks["a"], 0, 3), "b": PagedSequence(toks["b"], 1, 3),
            "c": PagedSequence(toks["c"], 2, 3)}
    got: dict[str, list[torch.Tensor]] = {k: [] for k in toks}
    logits = runner.execute([seqs["b"].item(0, 5), seqs["c"].item(0, 8)])
    got["b"].append(logits[0]); got["c"].append(logits[1])
    pos = {"b": 5, "c": 8}
    logits = runner.execute([seqs["b"].item(5, 6), seqs["a"].item(0, 6, sample=False), seqs["c"].item(8, 9)])
    got["b"].append(logits[0]); got["c"].append(logits[1])
    pos = {"a": 6, "b": 6, "c": 9}
    logits = runner.execute([seqs["a"].item(6, 11), seqs["b"].item(6, 7), seqs["c"].item(9, 10)])
    for i, k in enumerate("abc"):
        got[k].append(logits[i])
    pos = {"a": 11, "b": 7, "c": 10}
    while any(pos[k] < total[k] for k in pos):
        live = [k for k in "cab" if pos[k] < total[k]]
        logits = runner.execute([seqs[k].item(pos[k], pos[k] + 1) for k in live])
        for i, k in enumerate(live):
            got[k].append(logits[i])
            pos[k] += 1
    for k in toks:
        a, b = torch.stack(alone[k]), torch.stack(got[k])
        assert a.shape == b.shape
        assert _rel(b, a) < 1e-5, f"seq {k}: rel diff {_rel(b, a):.2e}"


def test_bf16_uses_a_fused_kernel_and_tracks_fp32(tmp_path: Path) -> None:
    ckpt, hf = build_pair("llama_4bit", tmp_path)
    runner = _runner(ckpt, torch.bfloat16)
    kernels = {m.kernel.name for m in runner.model.modules() if isinstance(m, PackedLinear)}
    # Whichever fused kernel the registry ranks first (cpu_int4pack at least), never the slow fallback.
    assert kernels and "dequant_fallback" not in kernels, kernels
    tokens = list(range(3, 19))
    seq = PagedSequence(tokens, 0, 1)
    ours = torch.cat([runner.execute([seq.item(0, 12)]),
                      *[runner.execute([seq.item(p, p + 1)]) for p in range(12, 16)]])
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0, 11:]
    assert _rel(ours, ref) < 5e-2


def test_weights_stay_packed(tmp_path: Path) -> None:
    ckpt, hf = build_pair("llama3_rope_tied_q8_embed", tmp_path)
    model, _ = load_model(ckpt, torch.float32)
    held = {t.data_ptr(): t.numel() * t.element_size()
            for t in [*model.parameters(), *model.buffers()] if t.numel()}
    held_bytes = sum(held.values()) - model.rotary.cos_table.numel() * 8  # minus the rope tables
    fp32_bytes = sum(p.numel() * 4 for p in hf.parameters())
    assert held_bytes < fp32_bytes / 3, (held_bytes, fp32_bytes)
    # No dense copy of any quantized layer: no float tensor of a quantized layer's [K, N] size.
    dense_shapes = {s for m in model.modules() if isinstance(m, PackedLinear)
                    for s in [(m.in_features, m.out_features), (m.out_features, m.in_features)]}
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert not [t for t in floats if tuple(t.shape) in dense_shapes]
    # The tied 8-bit embedding serves as the packed lm_head.
    head, emb = model.lm_head, model.model.embed_tokens
    assert isinstance(head, PackedLinear) and head.spec == QuantSpec(8, 32)
    if head.kernel.supports_columns:
        # Lookups read the head's packed layout: the embedding holds no tensor of its own.
        head_ptrs = {t.data_ptr() for t in head.packed_weights.values()}
        assert {t.data_ptr() for t in emb.buffers()} <= head_ptrs
    else:
        assert emb.qweight.dtype == torch.int32


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    ckpt, _ = build_pair("llama_4bit", tmp_path)
    import json

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(ckpt, torch.float32)


def test_block_table_too_short_is_rejected(tmp_path: Path) -> None:
    ckpt, _ = build_pair("llama_4bit", tmp_path)
    runner = _runner(ckpt)
    with pytest.raises(ValueError, match="block table"):
        runner.execute([SequenceInput(list(range(9)), 0, [0, 1])])
