"""Merge a random QA-LoRA adapter into real SmolLM2 layers and check outputs against the adapter formula."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.variants import QALoraLinearVariant
from safetensors.torch import save_file

from qalora_runtime.formats.checkpoint import MergedCheckpoint
from qalora_runtime.formats.merge import merge_adapter
from qalora_runtime.kernels.reference import dequantize

pytestmark = pytest.mark.slow

LAYERS = (0, 15, 29)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
POOL, RANK, ALPHA = 64, 8, 16


def write_adapter(root: Path, base: MergedCheckpoint) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT-style QA-LoRA adapter dir with random A/B for every projection of LAYERS."""
    root.mkdir()
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[p.split(".")[1] for p in PROJ],
                     use_qalora=True, qalora_group_size=POOL)
    cfg.save_pretrained(str(root))
    gen = torch.Generator().manual_seed(0)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for layer in LAYERS:
        for proj in PROJ:
            m = f"model.layers.{layer}.{proj}"
            qw = base.quantized(m)
            a = torch.randn(RANK, qw.in_features // POOL, generator=gen) * 0.1
            b = torch.randn(qw.out_features, RANK, generator=gen) * 0.1
            factors[m] = (a, b)
            tensors[f"base_model.model.{m}.lora_A.weight"] = a
            tensors[f"base_model.model.{m}.lora_B.weight"] = b
    save_file(tensors, str(root / "adapter_model.safetensors"))
    assert json.loads((root / "adapter_config.json").read_text())["use_qalora"] is True
    return factors


def peft_forward(x: torch.Tensor, base_y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PEFT's own QALoraLinearVariant.forward on a stand-in module holding the adapter."""
    lin_a = nn.Linear(a.shape[1], a.shape[0], bias=False)
    lin_b = nn.Linear(b.shape[1], b.shape[0], bias=False)
    lin_a.weight.data, lin_b.weight.data = a, b
    module = SimpleNamespace(
        lora_A={"default": lin_a}, lora_B={"default": lin_b}, lora_dropout={"default": nn.Identity()},
        scaling={"default": ALPHA / RANK}, qalora_group_size={"default": POOL}, training=False,
        in_features=x.shape[-1],
    )
    with torch.no_grad():
        return QALoraLinearVariant.forward(module, "default", x, base_y)


def paper_forward(x: torch.Tensor, base_y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    pooled = F.avg_pool1d(x.unsqueeze(1), POOL).squeeze(1)
    return base_y + pooled @ a.t() @ b.t() * (ALPHA / RANK)


@pytest.mark.parametrize("convention", ["peft", "qalora"])
def test_merge_into_smollm2(smollm2_dir: Path, tmp_path: Path, convention: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    base = MergedCheckpoint(smollm2_dir)
    factors = write_adapter(tmp_path / "adapter", base)
    report = merge_adapter(smollm2_dir, tmp_path / "adapter", tmp_path / "out", convention=convention)
    assert not report.requantized and len(report.modules) == len(LAYERS) * len(PROJ)
    merged = MergedCheckpoint(tmp_path / "out")
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for m, (a, b) in factors.items():
        qb, qm = base.quantized(m), merged.quantized(m)
        assert torch.equal(qb.qweight, qm.qweight) and torch.equal(qb.scales, qm.scales)
        xi = x[:, : qb.in_features].contiguous()
        base_y = xi @ dequantize(qb.qweight, qb.scales, qb.zeros, qb.spec)
        fwd = peft_forward if convention == "peft" else paper_forward
        ref = fwd(xi, base_y, a, b)
        got = xi @ dequantize(qm.qweight, qm.scales, qm.zeros, qm.spec)
        rel = float((got - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-5, (m, rel)
        assert float((base_y - ref).abs().max() / ref.abs().max()) > 1e-3  # the adapter matters
        worst = max(worst, rel)
    # Layers the adapter does not touch are copied unchanged.
    untouched = "model.layers.1.self_attn.q_proj"
    assert torch.equal(base.quantized(untouched).zeros, merged.quantized(untouched).zeros)
    assert torch.equal(base.tensor("model.norm.weight"), merged.tensor("model.norm.weight"))
    assert (tmp_path / "out" / "tokenizer.json").is_file() or (tmp_path / "out" / "tokenizer_config.json").is_file()
    with capsys.disabled():
        print(f"\n[merge smollm2 {convention}] {len(factors)} layers, worst output rel err {worst:.2e}, "
              f"max weight err from fp32 zeros {report.max_abs_weight_error:.2e}")
