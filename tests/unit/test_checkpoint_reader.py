"""The merged-format reader refuses every malformed checkpoint with a message naming the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from qalora_runtime.formats.checkpoint import CheckpointError, MergedCheckpoint, QuantizationConfig, save_checkpoint
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.quant.quantize import quantize_rtn
from qalora_runtime.quant.spec import QuantSpec

M = "model.layers.0.mlp.down_proj"


def write_valid(root: Path) -> Path:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))  # [N, K]
    qweight, scales, zeros = quantize_rtn(w, QuantSpec(4, 64))
    tensors = {f"{M}.qweight": qweight, f"{M}.scales": scales, f"{M}.zeros": zeros,
               f"{M}.bias": torch.zeros(32), "model.norm.weight": torch.ones(128)}
    return save_checkpoint(root, {"model_type": "llama"}, QuantizationConfig(bits=4, group_size=64), tensors)


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        t = load_file(str(root / "model.safetensors"))
        edit(t)
        save_file(t, str(root / "model.safetensors"))
    return apply


def _qconfig(**changes) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        cfg = json.loads((root / "config.json").read_text())
        cfg["quantization_config"].update(changes)
        (root / "config.json").write_text(json.dumps(cfg))
    return apply


def _truncate(root: Path) -> None:
    data = (root / "model.safetensors").read_bytes()
    (root / "model.safetensors").write_bytes(data[: len(data) // 2])


def _pickle_only(root: Path) -> None:
    (root / "model.safetensors").rename(root / "pytorch_model.bin")


CASES = {
    "missing tensor": (_tensors(lambda t: t.pop(f"{M}.zeros")), f"quantized module {M} is missing tensor {M}.zeros"),
    "wrong shape": (_tensors(lambda t: t.update({f"{M}.scales": torch.ones(3, 32, dtype=torch.float16)})),
                    rf"{M}.scales has shape \[3, 32\], expected \[2, 32\] \(in_features=128, group_size=64\)"),
    "wrong bias": (_tensors(lambda t: t.update({f"{M}.bias": torch.zeros(31)})), rf"{M}.bias has shape \[31\], expected \[32\]"),
    "qweight dtype": (_tensors(lambda t: t.update({f"{M}.qweight": t[f"{M}.qweight"].float()})),
                      f"{M}.qweight must be a 2-D int32 tensor"),
    "unknown bits": (_qconfig(bits=5), r"quantization_config: unsupported bits=5.*supported bits: \(2, 3, 4, 8\)"),
    "unknown override bits": (_qconfig(module_overrides={M: {"bits": 6}}), rf"module_overrides\['{M}'\]: unsupported bits=6"),
    "group does not divide K": (_qconfig(group_size=96), f"{M}: group_size 96 does not divide in_features 128"),
    "integer zeros": (_tensors(lambda t: t.update({f"{M}.zeros": t[f"{M}.zeros"].round().to(torch.int32)})),
                      f"{M}.zeros must be a float tensor .* integer zero-points are GPTQ; convert with `qalora convert`"),
    "truncated file": (_truncate, "model.safetensors is not a valid safetensors file \\(truncated or corrupt\\?\\)"),
    "pickle only": (_pickle_only, r"holds only pickle weights \(pytorch_model.bin\).*refused"),
    "bad json": (lambda r: (r / "config.json").write_text('{"model_type": "llama",'), "config.json is not valid JSON"),
    "no quantization_config": (lambda r: (r / "config.json").write_text('{"model_type": "llama"}'),
                               "has no quantization_config block"),
    "wrong quant_method": (_qconfig(quant_method="gptq"), "quant_method is 'gptq', expected 'qalora'.*qalora convert"),
    "future version": (_qconfig(format_version=2), "unsupported format_version 2"),
    "integer zero_point mode": (_qconfig(zero_point="int"), "zero_point must be 'float'"),
    "missing key": (lambda r: _drop_key(r, "bits"), "quantization_config is missing key 'bits'"),
    "no config": (lambda r: (r / "config.json").unlink(), "has no config.json"),
    "no weights": (lambda r: (r / "model.safetensors").unlink(), "has no .safetensors weights"),
    "missing shard": (lambda r: (r / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"{M}.qweight": "model-00001-of-00002.safetensors"}})),
        "shard listed in model.safetensors.index.json is missing: model-00001-of-00002.safetensors"),
}


def _drop_key(root: Path, key: str) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg["quantization_config"].pop(key)
    (root / "config.json").write_text(json.dumps(cfg))


def test_valid_checkpoint_reads(tmp_path: Path) -> None:
    ckpt = MergedCheckpoint(write_valid(tmp_path / "ckpt"))
    qw = ckpt.quantized(M)
    assert qw.spec == QuantSpec(4, 64) and (qw.in_features, qw.out_features) == (128, 32)
    assert dequantize(qw.qweight, qw.scales, qw.zeros, qw.spec).shape == (128, 32)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_checkpoint(tmp_path: Path, case: str) -> None:
    root = write_valid(tmp_path / "ckpt")
    corrupt, message = CASES[case]
    corrupt(root)
    with pytest.raises(CheckpointError, match=message):
        MergedCheckpoint(root)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        MergedCheckpoint(tmp_path / "nope")
