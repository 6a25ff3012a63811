"""Plumbing around Hugging Face style model directories shared by the importers and the merge.

Reading a directory's JSON and safetensors weights (refusing pickle), copying
the tokenizer / generation files that travel with a model, an in-memory
checkpoint (model config + quantization config + tensors) that importers build
and :func:`save_checkpoint` writes, and an output directory that only appears
once it is complete, so a failed conversion or merge leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import PICKLE_SUFFIXES, SAFE_INDEX, CheckpointError, QuantizationConfig, save_checkpoint

logger = logging.getLogger(__name__)

# Files that describe the tokenizer / generation defaults and travel unchanged with
# a converted model. An allowlist (not "everything else") so that a GPTQ
# quantize_config.json or a stray pickle never ends up in our output.
AUX_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template*",
    "generation_config.json",
    "preprocessor_config.json",
)


@dataclass
class InMemoryCheckpoint:
    """A merged-format checkpoint held in memory: what an importer produces before writing."""

    model_config: dict[str, Any]
    quant_config: QuantizationConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_dir: Path | None = None  # directory whose tokenizer/generation files go with the model

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write config, weights and aux files into ``out_dir`` (which must be new or empty)."""
        with atomic_output_dir(out_dir) as tmp:
            save_checkpoint(tmp, self.model_config, self.quant_config, self.tensors)
            if self.aux_dir is not None:
                copy_aux_files(self.aux_dir, tmp)
        return Path(out_dir)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object file, raising CheckpointError with the file name on any problem."""
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, raising CheckpointError unless it is an existing directory."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{what} directory not found: {p}")
    return p


def safetensors_files(src: Path) -> list[Path]:
    """The safetensors weight files of ``src`` (index first, else all ``*.safetensors``).

    Pickle-only directories are refused: unpickling can execute arbitrary code.
    """
    index = src / SAFE_INDEX
    if index.is_file():
        data = read_json(index, "safetensors index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted({src / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{src} holds only pickle weights ({', '.join(pickles)}); pickle files can execute "
            "code when loaded and are refused. Re-save the model with safetensors first."
        )
    raise CheckpointError(f"{src} has no .safetensors weights")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor in ``files``; corrupt files raise CheckpointError."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file.name} is not a valid safetensors file (truncated or corrupt?): {e}") from None


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of ``files`` in one dict (duplicate names across shards are an error)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in iter_tensors(files):
        if name in out:
            raise CheckpointError(f"tensor {name} appears in more than one weight file")
        out[name] = t
    return out


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, chat template and generation files from ``src`` to ``dst``; return their names."""
    copied: list[str] = []
    for pattern in AUX_FILE_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    logger.debug("copied aux files %s from %s", copied, src)
    return copied


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """Raise CheckpointError if ``out_dir`` exists and is not an empty directory."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output directory {out} already exists and is not empty")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; rename it into place only if the block succeeds.

    The temporary directory lives next to ``out_dir`` so the final rename stays on
    one filesystem (atomic); on any exception it is removed and ``out_dir`` is untouched.
    """
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        check_output_dir(out)  # someone may have created it meanwhile
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
