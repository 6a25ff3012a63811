"""GPTQ importer: tiny AutoGPTQ/GPTQModel dirs with known weights, both zero conventions, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qalora_runtime.formats.checkpoint import CheckpointError, MergedCheckpoint
from qalora_runtime.formats.gptq import GPTQConfig, convert_gptq, load_gptq, read_gptq_layer
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.quant.packing import pack_int32

BITS = (2, 3, 4, 8)
# name -> (K, N); N = 32 so qzeros pack along N for every bit width.
LAYERS = {
    "model.layers.0.self_attn.q_proj": (64, 32),
    "model.layers.0.mlp.down_proj": (128, 32),
}


def make_gptq_layer(
    k: int, n: int, bits: int, g: int, sym: bool, fmt: str, seed: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GPTQ tensors for one layer and the float64 W[K, N] they must dequantize to."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (k, n), generator=gen, dtype=torch.int32)
    if sym:
        z = torch.full((k // g, n), 1 << (bits - 1), dtype=torch.int32)
    else:
        z = torch.randint(1, maxq + 1, (k // g, n), generator=gen, dtype=torch.int32)  # v1 needs z >= 1
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.001).to(torch.float16)
    stored = z - 1 if fmt == "gptq" else z
    tensors = {
        "qweight": pack_int32(q, bits, dim=0),
        "qzeros": pack_int32(stored, bits, dim=1),
        "scales": scales,
        "g_idx": torch.arange(k, dtype=torch.int32) // g,
    }
    w = scales.double().repeat_interleave(g, 0) * (q.double() - z.double().repeat_interleave(g, 0))
    return tensors, w


def make_gptq_dir(
    root: Path,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = False,
    fmt: str = "gptq",
    config_in: str = "quantize_config",
    label: str | None = None,
    layers: dict[str, tuple[int, int]] = LAYERS,
) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Write a GPTQ checkpoint dir; ``label`` overrides the checkpoint_format written to the config."""
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for i, (name, (k, n)) in enumerate(layers.items()):
        g = k if group_size == -1 else group_size
        layer, w = make_gptq_layer(k, n, bits, g, sym, fmt, seed=bits * 100 + i)
        tensors.update({f"{name}.{s}": t for s, t in layer.items()})
        expected[name] = w
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.linspace(-1, 1, 32).half()
    plain = {
        "model.embed_tokens.weight": torch.randn(100, 64).half(),
        "model.norm.weight": torch.ones(64).half(),
        "lm_head.weight": torch.randn(100, 64).half(),
    }
    tensors.update(plain)
    save_file(tensors, str(root / "model.safetensors"))
    qc = {"bits": bits, "group_size": group_size, "sym": sym, "desc_act": False,
          "checkpoint_format": label or fmt, "quant_method": "gptq"}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}
    if config_in == "config":
        config["quantization_config"] = qc
    else:
        (root / "quantize_config.json").write_text(json.dumps(qc))
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer.json").write_text("{}")
    (root / "generation_config.json").write_text('{"eos_token_id": 2}')
    return root, expected, plain


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_convert_gives_exact_weights(tmp_path: Path, bits: int, sym: bool, fmt: str) -> None:
    src, expected, plain = make_gptq_dir(tmp_path / "gptq", bits=bits, sym=sym, fmt=fmt,
                                         config_in="config" if bits % 2 else "quantize_config")
    out = convert_gptq(src, tmp_path / "out")
    ckpt = MergedCheckpoint(out)
    raw = load_gptq(src).tensors
    for name, w in expected.items():
        qw = ckpt.quantized(name)
        assert qw.zeros.dtype == torch.float32
        assert torch.equal(qw.qweight, raw[f"{name}.qweight"])  # copied byte for byte
        got = dequantize(qw.qweight, qw.scales, qw.zeros, qw.spec, torch.float64)
        assert torch.equal(got, w), f"{name}: weights differ under {fmt}"
    bias = ckpt.quantized("model.layers.0.self_attn.q_proj").bias
    assert bias is not None and torch.equal(bias, torch.linspace(-1, 1, 32).half())
    for name, t in plain.items():
        assert torch.equal(ckpt.tensor(name), t)
    qc = ckpt.config["quantization_config"]
    assert qc["quant_method"] == "qalora" and qc["bits"] == bits and qc["group_size"] == 32
    assert set(qc["modules_not_quantized"]) == {"model.embed_tokens", "lm_head"}
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not (out / "quantize_config.json").exists()


def test_v1_field_max_means_z_equals_2_pow_bits(tmp_path: Path) -> None:
    """v1 stores z - 1 and the kernels add 1 with no wrap: a stored 15 (4-bit) is z = 16."""
    cfg = GPTQConfig(bits=4, group_size=32, sym=False, checkpoint_format="gptq")
    q = torch.full((32, 32), 3, dtype=torch.int32)
    tensors = {
        "l.qweight": pack_int32(q, 4),
        "l.qzeros": pack_int32(torch.full((1, 32), 15, dtype=torch.int32), 4, dim=1),
        "l.scales": torch.ones(1, 32, dtype=torch.float16),
    }
    qw = read_gptq_layer("l", tensors, cfg)  # g_idx absent: trivial assumed
    assert torch.equal(qw.zeros, torch.full((1, 32), 16.0))
    assert torch.equal(dequantize(qw.qweight, qw.scales, qw.zeros, qw.spec), torch.full((32, 32), -13.0))


@pytest.mark.parametrize("fmt, label", [("gptq", "gptq_v2"), ("gptq_v2", "gptq")])
def test_wrong_convention_changes_weights(tmp_path: Path, fmt: str, label: str) -> None:
    """Reading asym zeros under the other convention shifts every weight by one scale step."""
    src, expected, _ = make_gptq_dir(tmp_path / "gptq", bits=4, sym=False, fmt=fmt, label=label)
    ckpt = load_gptq(src)
    name = "model.layers.0.self_attn.q_proj"
    got = dequantize(ckpt.tensors[f"{name}.qweight"], ckpt.tensors[f"{name}.scales"],
                     ckpt.tensors[f"{name}.zeros"], ckpt.quant_config.spec_for(name), torch.float64)
    s = ckpt.tensors[f"{name}.scales"].double().repeat_interleave(32, 0)
    sign = 1.0 if fmt == "gptq" else -1.0  # v1 read as v2 loses the +1 on z: W grows by s
    assert torch.allclose(got - expected[name], sign * s)


@pytest.mark.parametrize("fmt, label", [("gptq", "gptq_v2"), ("gptq_v2", "gptq")])
def test_mislabelled_sym_checkpoint_refused(tmp_path: Path, fmt: str, label: str) -> None:
    src, _, _ = make_gptq_dir(tmp_path / "gptq", bits=4, sym=True, fmt=fmt, label=label)
    with pytest.raises(CheckpointError, match=f"sym=True but every zero-point is .* looks like '{fmt}'"):
        convert_gptq(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_group_size_minus_one_is_one_group_per_layer(tmp_path: Path) -> None:
    src, expected, _ = make_gptq_dir(tmp_path / "gptq", bits=4, group_size=-1, fmt="gptq_v2")
    ckpt = MergedCheckpoint(convert_gptq(src, tmp_path / "out"))
    assert ckpt.quantized_modules["model.layers.0.self_attn.q_proj"].group_size == 64
    assert ckpt.quantized_modules["model.layers.0.mlp.down_proj"].group_size == 128
    for name, w in expected.items():
        qw = ckpt.quantized(name)
        assert qw.scales.shape[0] == 1
        assert torch.equal(dequantize(qw.qweight, qw.scales, qw.zeros, qw.spec, torch.float64), w)


def _rewrite(src: Path, edit) -> None:
    from safetensors.torch import load_file
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"))


def test_act_order_refused(tmp_path: Path) -> None:
    src, _, _ = make_gptq_dir(tmp_path / "gptq")

    def permute(t: dict[str, torch.Tensor]) -> None:
        g_idx = t["model.layers.0.mlp.down_proj.g_idx"]
        t["model.layers.0.mlp.down_proj.g_idx"] = g_idx[torch.randperm(128, generator=torch.Generator().manual_seed(0))]

    _rewrite(src, permute)
    with pytest.raises(CheckpointError, match=r"down_proj.g_idx is not the trivial k // group_size.*act-order"):
        convert_gptq(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_desc_act_flag_with_trivial_g_idx_is_fine(tmp_path: Path) -> None:
    src, expected, _ = make_gptq_dir(tmp_path / "gptq")
    qc = json.loads((src / "quantize_config.json").read_text())
    (src / "quantize_config.json").write_text(json.dumps({**qc, "desc_act": True}))
    ckpt = load_gptq(src)
    assert set(expected) <= {n.rsplit(".", 1)[0] for n in ckpt.tensors if n.endswith(".zeros")}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.0.mlp.down_proj.qzeros"), "down_proj is missing tensor .*qzeros"),
        (lambda t: t.update({"model.layers.0.mlp.down_proj.qzeros": torch.zeros(3, 4, dtype=torch.int32)}),
         r"down_proj.qzeros must be an int32 \[4, 4\] tensor"),
        (lambda t: t.update({"model.layers.0.mlp.down_proj.scales": torch.zeros(4, 32, dtype=torch.int32)}),
         r"down_proj.scales must be a float \[4, 32\] tensor"),
        (lambda t: t.update({"model.layers.0.mlp.down_proj.qweight": torch.zeros(16, 32, dtype=torch.int64)}),
         "down_proj.qweight must be a 2-D int32 tensor"),
        (lambda t: t.update({"model.layers.0.mlp.down_proj.g_idx": torch.zeros(5, dtype=torch.int32)}),
         r"down_proj.g_idx has shape \[5\], expected \[128\]"),
    ],
)
def test_malformed_tensors(tmp_path: Path, edit, message: str) -> None:
    src, _, _ = make_gptq_dir(tmp_path / "gptq")
    _rewrite(src, edit)
    with pytest.raises(CheckpointError, match=message):
        convert_gptq(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "qc, message",
    [
        ({"bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
        ({"bits": 4, "group_size": 32, "quant_method": "awq"}, "quant_method is 'awq', not a GPTQ checkpoint"),
        ({"bits": 5, "group_size": 32}, "unsupported bits=5"),
        ({"group_size": 32}, "missing key 'bits'"),
        ({"bits": 4, "group_size": 48}, "down_proj: group_size 48 does not divide in_features 128"),
    ],
)
def test_bad_quantize_config(tmp_path: Path, qc: dict, message: str) -> None:
    src, _, _ = make_gptq_dir(tmp_path / "gptq")
    (src / "quantize_config.json").write_text(json.dumps(qc))
    with pytest.raises(CheckpointError, match=message):
        convert_gptq(src, tmp_path / "out")


def test_pickle_only_dir_refused(tmp_path: Path) -> None:
    src, _, _ = make_gptq_dir(tmp_path / "gptq")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*refused"):
        convert_gptq(src, tmp_path / "out")


def test_not_a_gptq_dir(tmp_path: Path) -> None:
    src, _, _ = make_gptq_dir(tmp_path / "gptq")
    (src / "quantize_config.json").unlink()
    with pytest.raises(CheckpointError, match="is not a GPTQ checkpoint: no quantize_config.json"):
        convert_gptq(src, tmp_path / "out")
    with pytest.raises(CheckpointError, match="GPTQ checkpoint directory not found"):
        convert_gptq(tmp_path / "nope", tmp_path / "out")


def test_existing_output_refused(tmp_path: Path) -> None:
    src, _, _ = make_gptq_dir(tmp_path / "gptq")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        convert_gptq(src, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
