"""RTN quantization: error bounds per bit width and group size, and `quantize_model` round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qalora_runtime.formats.checkpoint import CheckpointError, MergedCheckpoint
from qalora_runtime.formats.quantize_model import quantize_model
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.quant.quantize import quantize_rtn
from qalora_runtime.quant.spec import QuantSpec


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rtn_error_bound(bits: int, group_size: int) -> None:
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits * group_size)) * 0.05  # [N, K]
    spec = QuantSpec(bits, group_size)
    qweight, scales, zeros = quantize_rtn(w, spec)
    assert qweight.shape == (256 * bits // 32, 48) and qweight.dtype == torch.int32
    assert scales.shape == zeros.shape == (256 // group_size, 48)
    assert scales.dtype == torch.float16 and zeros.dtype == torch.float32
    deq = dequantize(qweight, scales, zeros, spec, torch.float64)  # [K, N]
    err = (deq - w.t().double()).abs()
    s = scales.double().repeat_interleave(group_size, 0)
    # Round-to-nearest: at most half a step (the scale is rounded to fp16 first, so this holds for stored values).
    assert bool((err <= 0.5 * s * (1 + 1e-6) + 1e-12).all()), float((err / s).max())
    # ... and half a step of the exact range: (max - min) / (2 * maxq), up to the fp16 scale rounding.
    grouped = w.t().double().reshape(256 // group_size, group_size, 48)
    step = ((grouped.amax(1) - grouped.amin(1)) / spec.max_q).repeat_interleave(group_size, 0)
    assert bool((err <= 0.5 * step * (1 + 2**-9)).all())
    # Uniform rounding error: mean |err| is about a quarter step (nothing systematically clamped).
    assert 0.2 < float((err / s).mean()) < 0.3


def test_rtn_orientations_agree() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    a = quantize_rtn(w, QuantSpec(4, 32), input_dim=1)
    b = quantize_rtn(w.t().contiguous(), QuantSpec(4, 32), input_dim=0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_rtn_constant_groups_are_exact() -> None:
    w = torch.zeros(8, 64)
    w[:, 32:] = 0.375
    w[0, :32] = -2.5
    qweight, scales, zeros = quantize_rtn(w, QuantSpec(3, 32))
    assert torch.equal(dequantize(qweight, scales, zeros, QuantSpec(3, 32)), w.t())


def test_rtn_extremes_hit_both_ends() -> None:
    """min maps to level 0 and max to maxq: the float zero puts the grid exactly on the range."""
    w = torch.linspace(-1.0, 3.0, 32).reshape(1, 32).repeat(32, 1)
    qweight, scales, zeros = quantize_rtn(w, QuantSpec(2, 32), scale_dtype=torch.float32)
    deq = dequantize(qweight, scales, zeros, QuantSpec(2, 32))
    assert torch.allclose(deq[0], torch.full((32,), -1.0), atol=1e-6)
    assert torch.allclose(deq[-1], torch.full((32,), 3.0), atol=1e-6)


@pytest.mark.parametrize(
    "weight, spec, message",
    [
        (torch.zeros(4, 48), QuantSpec(4, 32), "group_size 32 does not divide in_features 48"),
        (torch.zeros(4, 32, 2), QuantSpec(4, 32), "expects a 2-D weight"),
        (torch.zeros(4, 32, dtype=torch.int32), QuantSpec(4, 32), "expects a float weight"),
        (torch.full((4, 32), float("nan")), QuantSpec(4, 32), "NaN or infinite"),
    ],
)
def test_rtn_bad_input(weight: torch.Tensor, spec: QuantSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_rtn(weight, spec)


HIDDEN, INTER, VOCAB = 64, 128, 96


def make_float_model(root: Path, tied: bool = False, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A 2-layer Llama-shaped float checkpoint."""
    gen = torch.Generator().manual_seed(1)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen)}
    for i in range(2):
        p = f"model.layers.{i}"
        for name, shape in [("self_attn.q_proj", (HIDDEN, HIDDEN)), ("self_attn.k_proj", (32, HIDDEN)),
                            ("self_attn.v_proj", (32, HIDDEN)), ("self_attn.o_proj", (HIDDEN, HIDDEN)),
                            ("mlp.gate_proj", (INTER, HIDDEN)), ("mlp.up_proj", (INTER, HIDDEN)),
                            ("mlp.down_proj", (HIDDEN, INTER))]:
            t[f"{p}.{name}.weight"] = torch.randn(*shape, generator=gen) * 0.05
        t[f"{p}.self_attn.q_proj.bias"] = torch.randn(HIDDEN, generator=gen)
        t[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    t["model.norm.weight"] = torch.ones(HIDDEN)
    if not tied:
        t["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=gen)
    t = {k: v.to(dtype) for k, v in t.items()}
    root.mkdir(parents=True)
    save_file(t, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN,
                                                  "tie_word_embeddings": tied}))
    (root / "tokenizer_config.json").write_text("{}")
    return t


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_model_round_trip(tmp_path: Path, bits: int) -> None:
    src = make_float_model(tmp_path / "src")
    out = quantize_model(tmp_path / "src", tmp_path / "out", bits=bits, group_size=32, embed_bits=8, lm_head_bits=16)
    ckpt = MergedCheckpoint(out)
    linears = [n[: -len(".weight")] for n, v in src.items() if n.startswith("model.layers.") and v.dim() == 2]
    assert len(linears) == 14
    for m in linears:
        assert ckpt.quantized_modules[m] == QuantSpec(bits, 32)
        qw = ckpt.quantized(m)
        ref = quantize_rtn(src[f"{m}.weight"], QuantSpec(bits, 32))
        assert all(torch.equal(a, b) for a, b in zip((qw.qweight, qw.scales, qw.zeros), ref))
        err = (dequantize(qw.qweight, qw.scales, qw.zeros, qw.spec, torch.float64) - src[f"{m}.weight"].double().t())
        assert float(err.abs().max()) <= 0.5 * float(qw.scales.max()) * (1 + 1e-6)
    assert torch.equal(ckpt.quantized("model.layers.0.self_attn.q_proj").bias, src["model.layers.0.self_attn.q_proj.bias"])
    # 8-bit embedding in linear orientation: in = hidden, out = vocab.
    emb = ckpt.quantized("model.embed_tokens")
    assert emb.spec == QuantSpec(8, 32) and (emb.in_features, emb.out_features) == (HIDDEN, VOCAB)
    deq = dequantize(emb.qweight, emb.scales, emb.zeros, emb.spec).t()
    assert float((deq - src["model.embed_tokens.weight"].float()).abs().max()) < 0.02
    assert torch.equal(ckpt.tensor("lm_head.weight"), src["lm_head.weight"])
    assert torch.equal(ckpt.tensor("model.norm.weight"), src["model.norm.weight"])
    qc = ckpt.config["quantization_config"]
    assert qc["module_overrides"] == {"model.embed_tokens": {"bits": 8, "group_size": 32}}
    assert qc["modules_not_quantized"] == ["lm_head"]
    assert (out / "tokenizer_config.json").is_file()


def test_quantize_model_tied_fp32_defaults(tmp_path: Path) -> None:
    src = make_float_model(tmp_path / "src", tied=True, dtype=torch.float32)
    ckpt = MergedCheckpoint(quantize_model(tmp_path / "src", tmp_path / "out", bits=4, group_size=64))
    emb = ckpt.tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, src["model.embed_tokens.weight"].bfloat16())
    assert not ckpt.has("lm_head.weight") and not ckpt.has("lm_head.qweight")
    assert ckpt.config["quantization_config"]["modules_not_quantized"] == ["model.embed_tokens"]
    assert ckpt.config["tie_word_embeddings"] is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5, "group_size": 32}, "bits must be one of"),
        ({"bits": 4, "group_size": 16}, "group_size must be one of"),
        ({"bits": 4, "group_size": 32, "embed_bits": 4}, "embed_bits must be one of"),
        ({"bits": 4, "group_size": 32, "lm_head_bits": 2}, "lm_head_bits must be one of"),
        ({"bits": 4, "group_size": 128}, r"cannot quantize \[128, 64\] weight to 4-bit group 128: model.layers.0.mlp.gate_proj: group_size 128 does not divide in_features 64"),
    ],
)
def test_quantize_model_bad_options(tmp_path: Path, kwargs: dict, message: str) -> None:
    make_float_model(tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        quantize_model(tmp_path / "src", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_quantize_model_refuses_quantized_source(tmp_path: Path) -> None:
    make_float_model(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointError, match="already quantized \\(quant_method='gptq'\\)"):
        quantize_model(tmp_path / "src", tmp_path / "out", bits=4, group_size=32)


def test_cli_quantize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qalora_runtime.cli import main

    make_float_model(tmp_path / "src")
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "out"), "--bits", "3", "--group-size", "32"]) == 0
    assert MergedCheckpoint(tmp_path / "out").quant_config.bits == 3
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
    assert "model directory not found" in capsys.readouterr().err
