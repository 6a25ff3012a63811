"""The real default model: SmolLM2-135M-Instruct GGUF -> merged format, checked against gguf and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qalora_runtime.formats import default_model
from qalora_runtime.formats.checkpoint import MergedCheckpoint
from qalora_runtime.formats.gguf import hf_name, qk_unpermute_index
from qalora_runtime.kernels.reference import dequantize

pytestmark = pytest.mark.slow

HEADS, KV_HEADS = 9, 3


def _ours(ck: MergedCheckpoint, module: str, suffix: str = "weight") -> torch.Tensor:
    """A weight in HF orientation [out, in] from the converted checkpoint (float64)."""
    if ck.is_quantized(module):
        q = ck.quantized(module)
        return dequantize(q.qweight, q.scales, q.zeros, q.spec, torch.float64).T
    return ck.tensor(f"{module}.{suffix}").double()


def test_dequantizes_like_gguf(smollm2_dir: Path, smollm2_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every tensor of the file equals gguf's own dequantization up to float32 rounding of Q4_1 zeros."""
    ck = MergedCheckpoint(smollm2_dir)
    reader = gguf.GGUFReader(str(smollm2_gguf))
    worst_abs, worst_rel, worst_name, exact = 0.0, 0.0, "", 0
    for t in reader.tensors:
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)).double()
        if ".attn_q." in t.name or ".attn_k." in t.name:
            ref = ref[qk_unpermute_index(ref.shape[0], HEADS if ".attn_q." in t.name else KV_HEADS)]
        got = _ours(ck, *hf_name(t.name))
        assert got.shape == ref.shape, t.name
        diff = (got - ref).abs().max().item()
        rel = diff / ref.abs().max().item()
        # Q8_0 and F32 are bit exact; Q4_1 only differs by the float32 rounding of -m/d (~1 ulp)
        assert rel <= 2.0**-22, f"{t.name}: max abs diff {diff:.3g} (relative {rel:.3g})"
        exact += int(torch.equal(got.float(), ref.float()))
        if diff > worst_abs:
            worst_abs, worst_name = diff, t.name
        worst_rel = max(worst_rel, rel)
    assert exact >= 62  # 61 F32 norms + the Q8_0 embedding
    with capsys.disabled():
        print(f"\nSmolLM2 vs gguf.quants.dequantize over {len(reader.tensors)} tensors: max abs diff "
              f"{worst_abs:.3g} ({worst_name}), max diff / tensor max {worst_rel:.3g}, {exact} bit exact")


def test_weights_match_transformers_gguf_loader(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    """transformers' GGUF loader (its own dequantizer and q/k unpermute) gives the same weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    state = model.state_dict()
    ck = MergedCheckpoint(smollm2_dir)
    layers = (0, 17, 29)
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{m}.weight" for i in layers for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    ]
    for name in names:
        ref = state[name].double()
        got = _ours(ck, name.rsplit(".", 1)[0])
        assert (got - ref).abs().max().item() <= 2.0**-22 * ref.abs().max().item(), name


def test_config_matches_gguf_metadata(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    from transformers import AutoConfig

    ref = AutoConfig.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "head_dim"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-7)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)
    assert cfg["tie_word_embeddings"] is True
    ck = MergedCheckpoint(smollm2_dir)
    assert not ck.has("lm_head.qweight") and not ck.has("lm_head.weight")
    assert ck.quant_config.spec_for("model.embed_tokens").bits == 8
    assert ck.quant_config.spec_for("model.layers.3.mlp.down_proj").bits == 4
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines  ",
    "Ünïcödé — 日本語 😀 ∑x²",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
]


def test_tokenizer_and_chat_template_round_trip(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert len(tok) == len(ref) == 49152
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    assert tok.chat_template == ref.chat_template and tok.chat_template
    for chat in CHATS:
        for gen in (True, False):
            a = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert a == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok(a, add_special_tokens=False)["input_ids"] == ref(a, add_special_tokens=False)["input_ids"]
    assert tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(tok, attr) == getattr(ref, attr), attr
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert sorted(tok.all_special_ids) == sorted(ref.all_special_ids)


def test_default_model_is_converted_once_and_reused(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """smollm2_dir came from ensure_default_model; a second call (and resolve_model) reuses it."""
    cache = smollm2_dir.parent.parent  # <cache>/models/SmolLM2-135M-Instruct
    monkeypatch.setenv(default_model.CACHE_ENV, str(cache))

    def no_conversion(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached default model was converted again")

    monkeypatch.setattr(default_model, "convert_gguf", no_conversion)
    assert default_model.ensure_default_model() == smollm2_dir
    assert default_model.resolve_model(None) == smollm2_dir
    assert default_model.resolve_model("SmolLM2-135M-Instruct") == smollm2_dir
    assert default_model.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm2_dir
    assert default_model.resolve_model(str(smollm2_dir)) == smollm2_dir
