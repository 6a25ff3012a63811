"""Merged QA-LoRA checkpoint format v1: writer and validating reader.

A checkpoint is a Hugging Face style directory (see docs/FORMAT.md):
``config.json`` with a ``quantization_config`` block, tokenizer files, and
``model.safetensors`` (or shards plus ``model.safetensors.index.json``). Every
quantized linear ``P`` stores ``P.qweight`` (int32, GPTQ packing along the input
dim), ``P.scales`` and ``P.zeros`` (float, ``[K/G, N]``) and optionally ``P.bias``.

The reader validates the whole header up front (names, shapes, dtypes, bits,
group sizes) without loading tensor data, so a malformed checkpoint fails at
open with a message naming the tensor, never halfway through a model load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..quant.spec import SUPPORTED_BITS, QuantSpec

FORMAT_VERSION = 1
QUANT_METHOD = "qalora"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
QUANT_SUFFIXES = ("qweight", "scales", "zeros")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, malformed or not in the supported format."""


@dataclass
class QuantizedWeight:
    """One quantized linear layer in GPTQ orientation: ``W[K, N] = scales * (q - zeros)``."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        """K, the number of input features."""
        return self.qweight.shape[0] * 32 // self.spec.bits

    @property
    def out_features(self) -> int:
        """N, the number of output features."""
        return self.qweight.shape[1]


@dataclass(frozen=True)
class QuantizationConfig:
    """The ``quantization_config`` block of ``config.json`` (format v1).

    ``bits``/``group_size`` are the defaults; ``module_overrides`` gives another
    spec to named modules (e.g. an 8-bit embedding); modules listed in
    ``modules_not_quantized`` are stored as plain float tensors.
    """

    bits: int
    group_size: int
    module_overrides: dict[str, dict[str, int]] = field(default_factory=dict)
    modules_not_quantized: tuple[str, ...] = ()
    source: str | None = None

    def spec_for(self, module: str) -> QuantSpec:
        """The QuantSpec of ``module`` (its override or the default)."""
        over = self.module_overrides.get(module, {})
        return QuantSpec(over.get("bits", self.bits), over.get("group_size", self.group_size))

    def to_dict(self) -> dict[str, Any]:
        """JSON form written into config.json."""
        out: dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": "float",
            "module_overrides": self.module_overrides,
            "modules_not_quantized": list(self.modules_not_quantized),
        }
        if self.source:
            out["source"] = self.source
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizationConfig":
        """Parse and validate a config.json ``quantization_config`` block."""
        if d.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(
                f"quantization_config.quant_method is {d.get('quant_method')!r}, expected "
                f"{QUANT_METHOD!r} (convert GPTQ/GGUF checkpoints with `qalora convert`)"
            )
        if d.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"unsupported format_version {d.get('format_version')!r}; this runtime reads "
                f"version {FORMAT_VERSION}"
            )
        if d.get("zero_point", "float") != "float":
            raise CheckpointError(f"zero_point must be 'float', got {d.get('zero_point')!r}")
        overrides = d.get("module_overrides") or {}
        try:
            cfg = cls(
                bits=int(d["bits"]),
                group_size=int(d["group_size"]),
                module_overrides={k: dict(v) for k, v in overrides.items()},
                modules_not_quantized=tuple(d.get("modules_not_quantized") or ()),
                source=d.get("source"),
            )
        except KeyError as e:
            raise CheckpointError(f"quantization_config is missing key {e}") from None
        for module in [None, *cfg.module_overrides]:
            try:
                cfg.spec_for(module) if module else QuantSpec(cfg.bits, cfg.group_size)
            except ValueError as e:
                where = f"module_overrides[{module!r}]" if module else "quantization_config"
                raise CheckpointError(f"{where}: {e} (supported bits: {SUPPORTED_BITS})") from None
        return cfg


def save_checkpoint(
    out_dir: str | os.PathLike,
    model_config: dict[str, Any],
    quant_config: QuantizationConfig,
    tensors: dict[str, torch.Tensor],
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Write ``config.json`` and safetensors shard(s). Tokenizer files are the caller's job."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(model_config)
    config["quantization_config"] = quant_config.to_dict()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt", "qalora_format_version": str(FORMAT_VERSION)}
    if len(shards) == 1:
        save_file(shards[0], str(out / SAFE_SINGLE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


class MergedCheckpoint:
    """A validated, lazily loaded merged checkpoint directory.

    Opening reads only JSON and safetensors headers; tensors are read on demand
    with :meth:`tensor` / :meth:`quantized` (memory-mapped by safetensors).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path} has no config.json")
        try:
            self.config: dict[str, Any] = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
        if "quantization_config" not in self.config:
            raise CheckpointError(f"{config_file} has no quantization_config block")
        self.quant_config = QuantizationConfig.from_dict(self.config["quantization_config"])
        self._files = self._shard_files()
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for f in self._files:
            self._read_header(f)
        self.quantized_modules: dict[str, QuantSpec] = self._validate_quantized()

    # -- discovery -------------------------------------------------------
    def _shard_files(self) -> list[Path]:
        index = self.path / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is malformed: {e}") from None
            files = sorted({self.path / f for f in weight_map.values()})
        elif (self.path / SAFE_SINGLE).is_file():
            files = [self.path / SAFE_SINGLE]
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise CheckpointError(
                    f"{self.path} holds only pickle weights ({', '.join(pickles)}); pickle files "
                    "can execute code when loaded and are refused. Convert to safetensors first."
                )
            raise CheckpointError(f"{self.path} has no .safetensors weights")
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard listed in {SAFE_INDEX} is missing: {f.name}")
        return files

    def _read_header(self, file: Path) -> None:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{file.name}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                    self._meta[name] = (dtype, tuple(sl.get_shape()))
                    self._where[name] = file
        except SafetensorError as e:
            raise CheckpointError(f"{file.name} is not a valid safetensors file (truncated or corrupt?): {e}") from None

    def _validate_quantized(self) -> dict[str, QuantSpec]:
        modules = sorted({n.rsplit(".", 1)[0] for n in self._meta if n.rsplit(".", 1)[-1] in QUANT_SUFFIXES})
        specs: dict[str, QuantSpec] = {}
        for m in modules:
            for suffix in QUANT_SUFFIXES:
                if f"{m}.{suffix}" not in self._meta:
                    raise CheckpointError(f"quantized module {m} is missing tensor {m}.{suffix}")
            spec = self.quant_config.spec_for(m)
            qdtype, qshape = self._meta[f"{m}.qweight"]
            if qdtype != torch.int32 or len(qshape) != 2:
                raise CheckpointError(f"{m}.qweight must be a 2-D int32 tensor, got {qdtype} {list(qshape)}")
            if qshape[0] % spec.bits != 0:
                raise CheckpointError(
                    f"{m}.qweight has {qshape[0]} rows, not a multiple of bits={spec.bits}"
                )
            k, n = qshape[0] * 32 // spec.bits, qshape[1]
            if k % spec.group_size != 0:
                raise CheckpointError(
                    f"{m}: group_size {spec.group_size} does not divide in_features {k}"
                )
            for suffix in ("scales", "zeros"):
                dtype, shape = self._meta[f"{m}.{suffix}"]
                if dtype not in FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{m}.{suffix} must be a float tensor (float16/bfloat16/float32), got {dtype}"
                        + (" — integer zero-points are GPTQ; convert with `qalora convert`" if suffix == "zeros" else "")
                    )
                if shape != (k // spec.group_size, n):
                    raise CheckpointError(
                        f"{m}.{suffix} has shape {list(shape)}, expected [{k // spec.group_size}, {n}] "
                        f"(in_features={k}, group_size={spec.group_size})"
                    )
            if f"{m}.bias" in self._meta and self._meta[f"{m}.bias"][1] != (n,):
                raise CheckpointError(f"{m}.bias has shape {list(self._meta[f'{m}.bias'][1])}, expected [{n}]")
            specs[m] = spec
        return specs

    # -- access ----------------------------------------------------------
    def tensor_names(self) -> Iterator[str]:
        """All tensor names in the checkpoint."""
        return iter(sorted(self._meta))

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` from the header (no data read)."""
        return self._meta[name][1]

    def has(self, name: str) -> bool:
        """Whether tensor ``name`` exists."""
        return name in self._meta

    def tensor(self, name: str) -> torch.Tensor:
        """Load one tensor (raises CheckpointError naming it when absent)."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name} not found in {self.path}")
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def is_quantized(self, module: str) -> bool:
        """Whether ``module`` is stored as a packed quantized layer."""
        return module in self.quantized_modules

    def quantized(self, module: str) -> QuantizedWeight:
        """Load the packed tensors of quantized ``module``."""
        if module not in self.quantized_modules:
            raise CheckpointError(f"{module} is not a quantized module of {self.path}")
        bias = self.tensor(f"{module}.bias") if self.has(f"{module}.bias") else None
        return QuantizedWeight(
            qweight=self.tensor(f"{module}.qweight"),
            scales=self.tensor(f"{module}.scales"),
            zeros=self.tensor(f"{module}.zeros"),
            spec=self.quantized_modules[module],
            bias=bias,
        )

    def file_size(self) -> int:
        """Total bytes of the weight files."""
        return sum(f.stat().st_size for f in self._files)


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
