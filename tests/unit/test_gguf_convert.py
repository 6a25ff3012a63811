"""GGUF importer on small GGUF files written in the test (no real model needed)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qalora_runtime.formats import gguf as gguf_import
from qalora_runtime.formats.checkpoint import MergedCheckpoint
from qalora_runtime.formats.gguf import convert_gguf, hf_name, pack_levels, qk_unpermute_index
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.quant.packing import pack_int32

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 64, 4, 2, 128, 2, 96
HEAD_DIM = HIDDEN // HEADS

# one tensor type per linear, so every supported type passes through the whole pipeline
LAYER_TYPES = {
    "attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "F16",
    "ffn_gate": "BF16", "ffn_up": "F32", "ffn_down": "Q4_1",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows (the forward direction)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
    """Random float weights in HF orientation ([out, in]) keyed by GGUF name."""
    rng = np.random.default_rng(seed)
    w = {"token_embd.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
         "output_norm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)}
    if not tied:
        w["output.weight"] = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
              "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    for i in range(LAYERS):
        for name, shape in shapes.items():
            x = rng.standard_normal(shape).astype(np.float32) * 0.05 + 0.01 * rng.standard_normal((shape[0], 1))
            w[f"blk.{i}.{name}.weight"] = x.astype(np.float32)
        w[f"blk.{i}.attn_norm.weight"] = np.ones(HIDDEN, np.float32)
        w[f"blk.{i}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    # a constant block makes Q4_1 store d == 0 (its value must survive as m exactly)
    w["blk.0.attn_q.weight"][3, :32] = 0.3125
    w["blk.1.ffn_down.weight"][5, 32:64] = -1.5
    return w


def gguf_type(name: str, types: dict[str, str]) -> str:
    """The tensor type used for GGUF tensor ``name`` in the test files."""
    base, _, suffix = name.rpartition(".")
    if suffix != "weight":
        return "F32"  # biases
    if base in types:
        return types[base]
    return types.get(base.split(".")[2], "F32") if base.startswith("blk.") else "F32"


def write_gguf(path: Path, weights: dict[str, np.ndarray], types: dict[str, str], arch: str = "llama") -> Path:
    """Write a tiny Llama GGUF the way llama.cpp does (q/k rows permuted, blocks quantized)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_dimension_count(HEAD_DIM)
    for name, w in weights.items():
        if arch in ("llama", "mistral") and ".attn_q." in name:
            w = llama_cpp_permute(w, HEADS)
        elif arch in ("llama", "mistral") and ".attn_k." in name:
            w = llama_cpp_permute(w, KV_HEADS)
        qt = gguf.GGMLQuantizationType[gguf_type(name, types)]
        writer.add_tensor(name, gguf.quants.quantize(w, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def expected(w: np.ndarray, qtype: str) -> torch.Tensor:
    """What llama.cpp dequantizes ``w`` to after quantizing it as ``qtype`` (HF row order)."""
    qt = gguf.GGMLQuantizationType[qtype]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt).astype(np.float32))


def ours(ck: MergedCheckpoint, module: str) -> torch.Tensor:
    """A module's weight from the converted checkpoint, HF orientation [out, in], float64."""
    if ck.is_quantized(module):
        q = ck.quantized(module)
        return dequantize(q.qweight, q.scales, q.zeros, q.spec, torch.float64).T
    return ck.tensor(f"{module}.weight").double()


TYPES = {"token_embd": "Q8_0", "output": "Q4_0", **LAYER_TYPES}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, np.ndarray], Path, Path]:
    root = tmp_path_factory.mktemp("gguf")
    weights = _hf_weights(tied=True)
    src = write_gguf(root / "tiny.gguf", weights, TYPES)
    return weights, src, convert_gguf(src, root / "out", progress=False)


def test_every_type_dequantizes_exactly(tiny: tuple[dict[str, np.ndarray], Path, Path]) -> None:
    weights, _, out = tiny
    ck = MergedCheckpoint(out)
    for name, w in weights.items():
        module, _ = hf_name(name)
        qtype = gguf_type(name, TYPES)
        ref = expected(w, qtype).double()
        got = ours(ck, module)
        assert got.shape == ref.shape, name
        if qtype == "Q4_1":
            # only the float32 rounding of the stored zero -m/d: ~1 ulp of float32
            tol = 2.0 ** -22 * ref.abs().max().item()
            assert (got - ref).abs().max().item() <= tol, name
        else:
            assert torch.equal(got.float(), ref.float()), name  # bit exact


def test_q4_1_zero_scale_block_reproduces_min_exactly(tiny: tuple[dict[str, np.ndarray], Path, Path]) -> None:
    _, _, out = tiny
    ck = MergedCheckpoint(out)
    assert torch.equal(ours(ck, "model.layers.0.self_attn.q_proj")[3, :32], torch.full((32,), 0.3125, dtype=torch.float64))
    assert torch.equal(ours(ck, "model.layers.1.mlp.down_proj")[5, 32:64], torch.full((32,), -1.5, dtype=torch.float64))


def test_layout_dtypes_and_quant_config(tiny: tuple[dict[str, np.ndarray], Path, Path]) -> None:
    _, _, out = tiny
    ck = MergedCheckpoint(out)
    qc = ck.quant_config
    assert (qc.bits, qc.group_size) == (4, 32)
    assert qc.module_overrides == {
        "model.embed_tokens": {"bits": 8, "group_size": 32},
        **{f"model.layers.{i}.self_attn.v_proj": {"bits": 8, "group_size": 32} for i in range(LAYERS)},
    }
    assert set(qc.modules_not_quantized) == {
        f"model.layers.{i}.{m}" for i in range(LAYERS) for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
    }
    # GPTQ orientation: K = input features; the embedding is stored like a tied lm_head (in = hidden)
    assert ck.shape("model.embed_tokens.qweight") == (HIDDEN * 8 // 32, VOCAB)
    assert ck.shape("model.layers.0.mlp.down_proj.qweight") == (FFN * 4 // 32, HIDDEN)
    assert ck.shape("model.layers.0.mlp.down_proj.scales") == (FFN // 32, HIDDEN)
    assert ck.tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
    assert ck.tensor("model.layers.0.self_attn.q_proj.zeros").dtype == torch.float32
    assert ck.tensor("model.layers.0.self_attn.o_proj.weight").dtype == torch.float16
    assert ck.tensor("model.layers.0.mlp.gate_proj.weight").dtype == torch.bfloat16
    assert ck.tensor("model.norm.weight").dtype == torch.float32
    assert not ck.has("lm_head.qweight") and not ck.has("lm_head.weight")
    cfg = ck.config
    assert cfg["tie_word_embeddings"] is True
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (HIDDEN, HEADS, KV_HEADS)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["vocab_size"]) == (10000.0, 1e-5, VOCAB)
    assert (out / gguf_import.SOURCE_FILE).is_file()
    assert not (out / "tokenizer.json").exists()  # the tiny file has no tokenizer metadata


def test_matches_transformers_gguf_loader(tiny: tuple[dict[str, np.ndarray], Path, Path]) -> None:
    """transformers dequantizes and unpermutes q/k on its own: an independent check of names and permute."""
    from transformers import AutoModelForCausalLM

    _, src, out = tiny
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    ck = MergedCheckpoint(out)
    state = model.state_dict()
    checked = 0
    for name, ref in state.items():
        module, suffix = name.rsplit(".", 1)
        if name == "lm_head.weight":
            module = "model.embed_tokens"  # tied
        if suffix != "weight" or "rotary" in name:
            continue
        got = ours(ck, module) if (ck.is_quantized(module) or ck.has(f"{module}.weight")) else None
        assert got is not None, f"{module} missing from the converted checkpoint"
        torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=1e-6 * max(1.0, ref.abs().max().item()))
        checked += 1
    assert checked >= 2 + LAYERS * 9


def test_untied_output_becomes_lm_head(tmp_path: Path) -> None:
    weights = _hf_weights(seed=1, tied=False)
    out = convert_gguf(write_gguf(tmp_path / "untied.gguf", weights, TYPES), tmp_path / "out", progress=False)
    ck = MergedCheckpoint(out)
    assert ck.config["tie_word_embeddings"] is False
    assert ck.quant_config.spec_for("lm_head").bits == 4
    assert torch.equal(ours(ck, "lm_head").float(), expected(weights["output.weight"], "Q4_0"))


def test_qk_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(48 * 3).reshape(48, 3)
    for heads in (1, 2, 3, 4, 6):
        assert np.array_equal(llama_cpp_permute(w, heads)[qk_unpermute_index(48, heads)], w)
    with pytest.raises(ValueError):
        qk_unpermute_index(10, 3)


@pytest.mark.parametrize("bits", [4, 8])
def test_fast_packing_matches_gptq_packer(bits: int) -> None:
    levels = np.random.default_rng(bits).integers(0, 1 << bits, size=(128, 40), dtype=np.uint8)
    assert torch.equal(pack_levels(levels, bits), pack_int32(torch.from_numpy(levels).int(), bits, dim=0))


def _write_raw(path: Path, name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType, arch: str = "llama") -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_head_count(HEADS)
    writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", ["Q5_0", "Q2_K"])
def test_unsupported_type_is_refused_by_name(tmp_path: Path, qtype: str) -> None:
    qt = gguf.GGMLQuantizationType[qtype]
    if qtype == "Q5_0":
        data = gguf.quants.quantize(np.ones((4, 64), np.float32), qt)
    else:  # gguf cannot quantize Q2_K: craft raw blocks (256 elements in 84 bytes)
        data = np.zeros((4, 84), np.uint8)
    src = _write_raw(tmp_path / "bad.gguf", "blk.0.ffn_up.weight", data, qt)
    with pytest.raises(ValueError) as e:
        convert_gguf(src, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "'blk.0.ffn_up.weight'" in msg and qtype in msg
    assert all(t in msg for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def test_unsupported_architecture_and_names(tmp_path: Path) -> None:
    f32 = gguf.GGMLQuantizationType.F32
    src = _write_raw(tmp_path / "gpt2.gguf", "token_embd.weight", np.ones((4, 32), np.float32), f32, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported; supported: llama"):
        convert_gguf(src, tmp_path / "out", progress=False)
    src = _write_raw(tmp_path / "odd.gguf", "blk.0.ssm_conv.weight", np.ones((4, 32), np.float32), f32)
    with pytest.raises(ValueError, match="'blk.0.ssm_conv.weight' has no known Llama-family equivalent"):
        convert_gguf(src, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out", progress=False)


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_gguf(tmp_path / "tiny.gguf", _hf_weights(seed=2), TYPES)

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "save_checkpoint", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_refuses_non_empty_output(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "tiny.gguf", _hf_weights(seed=3), TYPES)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        convert_gguf(src, tmp_path / "out", progress=False)
    (tmp_path / "out" / "keep.txt").unlink()
    assert MergedCheckpoint(convert_gguf(src, tmp_path / "out", progress=False)).quant_config.bits == 4


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures(tmp_path: Path, arch: str) -> None:
    """qwen2 is not permuted by llama.cpp and has q/k/v biases; mistral is permuted like llama."""
    weights = _hf_weights(seed=4)
    rng = np.random.default_rng(5)
    for i in range(LAYERS):
        for name, n in (("attn_q", HIDDEN), ("attn_k", KV_HEADS * HEAD_DIM), ("attn_v", KV_HEADS * HEAD_DIM)):
            weights[f"blk.{i}.{name}.bias"] = rng.standard_normal(n).astype(np.float32)
    out = convert_gguf(write_gguf(tmp_path / f"{arch}.gguf", weights, TYPES, arch=arch), tmp_path / "out", progress=False)
    ck = MergedCheckpoint(out)
    assert ck.config["model_type"] == arch
    assert ck.config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[arch]]
    for i in range(LAYERS):
        for proj, name in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
            module = f"model.layers.{i}.self_attn.{proj}"
            w = weights[f"blk.{i}.{name}.weight"]
            assert ours(ck, module).shape == w.shape
            ref = expected(w, TYPES[name]).double()
            assert (ours(ck, module) - ref).abs().max().item() <= 2.0**-22 * ref.abs().max().item()
            assert torch.equal(ck.tensor(f"{module}.bias"), torch.from_numpy(weights[f"blk.{i}.{name}.bias"]))


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qalora_runtime.cli import main

    src = write_gguf(tmp_path / "tiny.gguf", _hf_weights(seed=6), TYPES)
    assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 0
    assert MergedCheckpoint(tmp_path / "out").quant_config.bits == 4
    assert "wrote merged checkpoint" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope.gguf"), str(tmp_path / "o2")]) == 2
    assert "SRC must be a .gguf file or a GPTQ checkpoint directory" in capsys.readouterr().err
