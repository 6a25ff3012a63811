"""QA-LoRA merge: exactness against PEFT's own forward and the paper formula, refusals, malformed inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.variants import QALoraLinearVariant
from safetensors.torch import load_file, save_file

from qalora_runtime.formats.checkpoint import CheckpointError, MergedCheckpoint
from qalora_runtime.formats.gptq import convert_gptq
from qalora_runtime.formats.merge import load_base, merge_adapter
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.quant.packing import pack_int32

K = 256
SHAPES = {"q_proj": 64, "v_proj": 32}  # out features; q_proj has a bias
PREFIX = "model.layers.0.self_attn"


class QALoraDense(LoraLinear):
    """PEFT's LoRA Linear with its QA-LoRA variant forced on (PEFT only enables it for GPTQ layers)."""

    @property
    def lora_variants(self):
        return {(): QALoraLinearVariant}


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(K, SHAPES["q_proj"], bias=True)
        self.v_proj = nn.Linear(K, SHAPES["v_proj"], bias=False)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attn()


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer()])


class Tiny(nn.Module):
    """Just enough module tree that PEFT names tensors base_model.model.model.layers.0.self_attn.*."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()


def make_gptq_base(root: Path, bits: int, g: int, fmt: str = "gptq") -> Path:
    """A GPTQ dir (asym, integer zeros) holding q_proj and v_proj of layer 0."""
    gen = torch.Generator().manual_seed(bits * 7 + g)
    maxq = (1 << bits) - 1
    t: dict[str, torch.Tensor] = {}
    for name, n in SHAPES.items():
        q = torch.randint(0, maxq + 1, (K, n), generator=gen, dtype=torch.int32)
        z = torch.randint(1, maxq + 1, (K // g, n), generator=gen, dtype=torch.int32)
        t[f"{PREFIX}.{name}.qweight"] = pack_int32(q, bits)
        t[f"{PREFIX}.{name}.qzeros"] = pack_int32(z - 1 if fmt == "gptq" else z, bits, dim=1)
        t[f"{PREFIX}.{name}.scales"] = (torch.rand(K // g, n, generator=gen) * 0.02 + 0.002).half()
        t[f"{PREFIX}.{name}.g_idx"] = torch.arange(K, dtype=torch.int32) // g
    t[f"{PREFIX}.q_proj.bias"] = torch.randn(SHAPES["q_proj"], generator=gen).half()
    t["lm_head.weight"] = torch.randn(10, K, generator=gen).half()
    root.mkdir(parents=True)
    save_file(t, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": bits, "group_size": g, "sym": False, "checkpoint_format": fmt}}))
    (root / "tokenizer.json").write_text("{}")
    return root


def base_weights(base: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Dense float64 W[K, N] and bias of each layer, read through our importer + reference dequantizer."""
    mem, _ = load_base(base)
    out = {}
    for name in SHAPES:
        m = f"{PREFIX}.{name}"
        w = dequantize(mem.tensors[f"{m}.qweight"], mem.tensors[f"{m}.scales"], mem.tensors[f"{m}.zeros"],
                       mem.quant_config.spec_for(m), torch.float64)
        out[name] = (w, mem.tensors.get(f"{m}.bias"))
    return out


def _dense(ckpt: MergedCheckpoint, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    qw = ckpt.quantized(module)
    return dequantize(qw.qweight, qw.scales, qw.zeros, qw.spec, torch.float64), qw.bias


def make_peft_adapter(out: Path, base: Path, pool: int, **cfg_kwargs) -> nn.Module:
    """A real PEFT QA-LoRA model over the dequantized base, saved with save_pretrained; returns the model."""
    torch.manual_seed(pool)
    tiny = Tiny()
    for name, (w, b) in base_weights(base).items():
        lin = getattr(tiny.model.layers[0].self_attn, name)
        lin.weight.data = w.t().float().contiguous()
        if b is not None:
            lin.bias.data = b.float()
    kwargs = dict(r=4, lora_alpha=8, target_modules=list(SHAPES), use_qalora=True, qalora_group_size=pool,
                  init_lora_weights=False)
    kwargs.update(cfg_kwargs)
    cfg = LoraConfig(**kwargs)
    cfg._register_custom_module({nn.Linear: QALoraDense})
    model = get_peft_model(tiny, cfg)
    model.eval()
    model.save_pretrained(str(out))
    return model


def peft_layer(model: nn.Module, name: str) -> nn.Module:
    return getattr(model.base_model.model.model.layers[0].self_attn, name)


def paper_forward(layer: nn.Module, x: torch.Tensor, pool: int) -> torch.Tensor:
    """The original QA-LoRA formula: base(x) + AvgPool(x) @ A^T @ B^T * scaling (no K/L factor)."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    pooled = F.avg_pool1d(x.unsqueeze(1), pool).squeeze(1)
    return layer.base_layer(x) + pooled @ a.t() @ b.t() * layer.scaling["default"]


def merged_forward(out: Path, name: str, x: torch.Tensor) -> torch.Tensor:
    w, b = _dense(MergedCheckpoint(out), f"{PREFIX}.{name}")
    y = x @ w.float()
    return y + b.float() if b is not None else y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("convention", ["peft", "qalora"])
@pytest.mark.parametrize("g, pool", [(32, 32), (32, 64), (64, 128)])
def test_merge_matches_adapter_forward(tmp_path: Path, bits: int, convention: str, g: int, pool: int) -> None:
    base = make_gptq_base(tmp_path / "base", bits, g, fmt="gptq" if bits % 2 == 0 else "gptq_v2")
    model = make_peft_adapter(tmp_path / "adapter", base, pool)
    report = merge_adapter(base, tmp_path / "adapter", tmp_path / "out", convention=convention)
    assert not report.requantized and len(report.modules) == 2
    x = torch.randn(7, K, generator=torch.Generator().manual_seed(0))
    for name in SHAPES:
        layer = peft_layer(model, name)
        with torch.no_grad():
            ref = layer(x) if convention == "peft" else paper_forward(layer, x, pool)
            base_y = layer.base_layer(x)
        got = merged_forward(tmp_path / "out", name, x)
        assert rel_err(got, ref) <= 1e-5, (name, rel_err(got, ref))
        assert rel_err(base_y, ref) > 1e-3  # the adapter moves outputs 100x more than the tolerance
    # q and s are untouched; only the zeros move.
    raw = load_file(str(tmp_path / "out" / "model.safetensors"))
    src = load_file(str(base / "model.safetensors"))
    for name in SHAPES:
        assert torch.equal(raw[f"{PREFIX}.{name}.qweight"], src[f"{PREFIX}.{name}.qweight"])
        assert torch.equal(raw[f"{PREFIX}.{name}.scales"], src[f"{PREFIX}.{name}.scales"])
        assert raw[f"{PREFIX}.{name}.zeros"].dtype == torch.float32
    assert report.max_abs_weight_error < 1e-6
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_conventions_differ_by_k_over_l(tmp_path: Path) -> None:
    """A merge with the wrong convention would be caught: the deltas differ by exactly K/L."""
    base = make_gptq_base(tmp_path / "base", 4, 32)
    make_peft_adapter(tmp_path / "adapter", base, 64)
    merge_adapter(base, tmp_path / "adapter", tmp_path / "peft", convention="peft")
    merge_adapter(base, tmp_path / "adapter", tmp_path / "paper", convention="qalora")
    w0 = base_weights(base)["q_proj"][0]
    d_peft = _dense(MergedCheckpoint(tmp_path / "peft"), f"{PREFIX}.q_proj")[0] - w0
    d_paper = _dense(MergedCheckpoint(tmp_path / "paper"), f"{PREFIX}.q_proj")[0] - w0
    # atol: the merged zeros are float32, |s * dz| <= 0.022 * 16 * 2**-24 ~ 2e-8 per weight.
    assert torch.allclose(d_peft, d_paper * (K / 64), rtol=1e-6, atol=1e-7)
    assert float(d_paper.abs().max()) > 1e-3


def test_merge_onto_merged_base_and_rslora_alpha_pattern(tmp_path: Path) -> None:
    """Base = a merged qalora dir (float zeros); rslora and per-module alpha follow PEFT's scaling."""
    gptq = make_gptq_base(tmp_path / "gptq", 3, 32, fmt="gptq_v2")
    base = convert_gptq(gptq, tmp_path / "base")
    model = make_peft_adapter(tmp_path / "adapter", base, 64, use_rslora=True, alpha_pattern={"v_proj": 3})
    assert peft_layer(model, "v_proj").scaling["default"] == pytest.approx(3 / 2)
    report = merge_adapter(base, tmp_path / "adapter", tmp_path / "out")
    assert report.base_kind == "qalora"
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1))
    for name in SHAPES:
        with torch.no_grad():
            ref = peft_layer(model, name)(x)
        assert rel_err(merged_forward(tmp_path / "out", name, x), ref) <= 1e-5


@pytest.mark.parametrize("g, pool", [(32, 16), (64, 32), (64, 16)])
def test_non_divisible_refused(tmp_path: Path, g: int, pool: int) -> None:
    base = make_gptq_base(tmp_path / "base", 4, g)
    make_peft_adapter(tmp_path / "adapter", base, pool)
    with pytest.raises(CheckpointError, match=rf"cannot merge exactly.*\(L={pool}, G={g}\).*varies inside a quantization group.*--requantize"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_requantize_reports_its_error(tmp_path: Path) -> None:
    base = make_gptq_base(tmp_path / "base", 4, 32)
    model = make_peft_adapter(tmp_path / "adapter", base, 16)
    report = merge_adapter(base, tmp_path / "adapter", tmp_path / "out", requantize=True)
    assert report.requantized and "LOSSY" in report.summary()
    ckpt = MergedCheckpoint(tmp_path / "out")
    for name in SHAPES:
        layer = peft_layer(model, name)
        # Exact target W + dW from PEFT's own forward on the identity.
        with torch.no_grad():
            y = layer(torch.eye(K))
            target = (y - layer.base_layer.bias if layer.base_layer.bias is not None else y).double()
        w, _ = _dense(ckpt, f"{PREFIX}.{name}")
        err = (w - target).abs()
        mod = next(m for m in report.modules if m.name.endswith(name))
        assert float(err.max()) <= mod.max_abs_weight_error + 1e-6
        assert 0 < mod.max_abs_weight_error <= 0.5 * float(ckpt.quantized(f"{PREFIX}.{name}").scales.max()) * 1.001


# -- malformed inputs: each names the problem and writes nothing ------------------------------
def _edit_config(adapter: Path, **changes) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(adapter: Path, edit) -> None:
    t = load_file(str(adapter / "adapter_model.safetensors"))
    edit(t)
    save_file(t, str(adapter / "adapter_model.safetensors"))


A_Q = f"base_model.model.{PREFIX}.q_proj.lora_A.weight"
B_Q = f"base_model.model.{PREFIX}.q_proj.lora_B.weight"

MALFORMED = {
    "no adapter dir": (lambda a: shutil.rmtree(a), "adapter directory not found"),
    "no config": (lambda a: (a / "adapter_config.json").unlink(), "adapter_config.json not found"),
    "bad json": (lambda a: (a / "adapter_config.json").write_text("{r: 4"), "adapter_config.json is not valid JSON"),
    "no weights": (lambda a: (a / "adapter_model.safetensors").unlink(), "adapter weights not found"),
    "pickle weights": (lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin"),
                       r"only pickle weights \(adapter_model.bin\)"),
    "truncated weights": (lambda a: (a / "adapter_model.safetensors").write_bytes(
        (a / "adapter_model.safetensors").read_bytes()[:100]), "not a valid safetensors file"),
    "plain lora": (lambda a: _edit_config(a, use_qalora=False),
                   "plain LoRA adapter.*cannot be merged exactly into a quantized model"),
    "dora": (lambda a: _edit_config(a, use_dora=True), "unsupported option use_dora=True"),
    "bias": (lambda a: _edit_config(a, bias="all"), "unsupported option bias='all'"),
    "modules_to_save": (lambda a: _edit_config(a, modules_to_save=["lm_head"]), "unsupported option modules_to_save"),
    "not lora": (lambda a: _edit_config(a, peft_type="IA3"), "peft_type is 'IA3'"),
    "bad r": (lambda a: _edit_config(a, r=0), "r must be a positive number"),
    "rank mismatch": (lambda a: _edit_config(a, r=8), "lora_A has rank 4 but the adapter config says r=8"),
    "no match": (lambda a: _edit_tensors(a, lambda t: t.update({
        A_Q.replace("layers.0", "layers.9"): t[A_Q].clone(), B_Q.replace("layers.0", "layers.9"): t[B_Q].clone()})),
        r"1 adapter module\(s\) match no quantized layer.*model.layers.9.self_attn.q_proj"),
    "unquantized target": (lambda a: _edit_tensors(a, lambda t: t.update({
        "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 4), "base_model.model.lm_head.lora_B.weight": torch.zeros(10, 4)})),
        r"match no quantized layer.*\(lm_head exist but are not quantized\)"),
    "B rows": (lambda a: _edit_tensors(a, lambda t: t.update({B_Q: torch.zeros(65, 4)})),
               "lora_B has 65 rows but the base layer has 64 outputs"),
    "A cols": (lambda a: _edit_tensors(a, lambda t: t.update({A_Q: torch.zeros(4, 8)})),
               r"lora_A has shape \[4, 8\], expected \[r, 256 / 64\]"),
    "A/B rank": (lambda a: _edit_tensors(a, lambda t: t.update({B_Q: torch.zeros(64, 3)})),
                 r"lora_A \[4, 4\] and lora_B \[64, 3\] are not \[r, K/L\] and \[N, r\]"),
    "nan": (lambda a: _edit_tensors(a, lambda t: t[B_Q].__setitem__((0, 0), float("nan"))),
            "q_proj: lora_A/lora_B contain NaN or infinite values"),
    "missing B": (lambda a: _edit_tensors(a, lambda t: t.pop(B_Q)), "q_proj has no lora_B weight"),
    "extra tensor": (lambda a: _edit_tensors(a, lambda t: t.update({"base_model.model.foo.lora_magnitude_vector": torch.zeros(3)})),
                     "unexpected tensor base_model.model.foo.lora_magnitude_vector"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_adapter(tmp_path: Path, case: str) -> None:
    base = make_gptq_base(tmp_path / "base", 4, 32)
    make_peft_adapter(tmp_path / "adapter", base, 64)
    edit, message = MALFORMED[case]
    edit(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=message):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_malformed_base_and_output(tmp_path: Path) -> None:
    base = make_gptq_base(tmp_path / "base", 4, 32)
    make_peft_adapter(tmp_path / "adapter", base, 64)
    with pytest.raises(CheckpointError, match="base model directory not found"):
        merge_adapter(tmp_path / "nope", tmp_path / "adapter", tmp_path / "out")
    with pytest.raises(CheckpointError, match="convention must be one of"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "out", convention="lora")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "keep"
    src = load_file(str(base / "model.safetensors"))
    src[f"{PREFIX}.v_proj.qzeros"] = torch.zeros(3, dtype=torch.int32)
    save_file(src, str(base / "model.safetensors"))
    with pytest.raises(CheckpointError, match="v_proj.qzeros must be an int32"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "out2")
    assert_nothing_written(tmp_path / "out2")


def test_qalora_convention_infers_pool_from_shapes(tmp_path: Path) -> None:
    """Original QA-LoRA configs have no use_qalora/qalora_group_size: L is K / A.shape[1]."""
    base = make_gptq_base(tmp_path / "base", 4, 32)
    model = make_peft_adapter(tmp_path / "adapter", base, 64)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    for key in ("use_qalora", "qalora_group_size"):
        cfg.pop(key)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="plain LoRA"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "out", convention="peft")
    merge_adapter(base, tmp_path / "adapter", tmp_path / "out", convention="qalora")
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = paper_forward(peft_layer(model, "q_proj"), x, 64)
    assert rel_err(merged_forward(tmp_path / "out", "q_proj", x), ref) <= 1e-5


def test_cli_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qalora_runtime.cli import main

    base = make_gptq_base(tmp_path / "base", 4, 32)
    make_peft_adapter(tmp_path / "adapter", base, 32)
    args = ["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter")]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert "merged 2 layers" in capsys.readouterr().out
    make_peft_adapter(tmp_path / "adapter16", base, 16)
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter16"), "--out", str(tmp_path / "o2")]) == 2
    assert "cannot merge exactly" in capsys.readouterr().err
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter16"), "--out", str(tmp_path / "o2"),
                 "--requantize"]) == 0
    assert "LOSSY" in capsys.readouterr().out
