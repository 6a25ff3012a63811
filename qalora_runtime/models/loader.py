"""``load_model``: a merged checkpoint directory -> a ready model in the chosen compute dtype."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from ..formats.checkpoint import MergedCheckpoint
from .config import DecoderConfig
from .llama import DecoderForCausalLM
from .registry import build_model

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype: explicit, or the default for ``device`` (bf16 on CPU, bf16/fp16 on GPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of bf16, fp16, fp32")
    return DTYPES[dtype]


def load_model(path: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: torch.device | str = "cpu") -> tuple[DecoderForCausalLM, DecoderConfig]:
    """Load a merged checkpoint: meta-device skeleton, then packed layers straight from the file."""
    start = time.perf_counter()
    ckpt = MergedCheckpoint(path)
    torch_dtype = resolve_dtype(dtype, device)
    model, cfg = build_model(ckpt.config)
    model.load_weights(ckpt, torch_dtype, device)
    model.eval()
    logger.info("loaded %s (%s, %d layers) as %s on %s in %.1fs", ckpt.path.name, cfg.architecture,
                cfg.num_layers, torch_dtype, device, time.perf_counter() - start)
    return model, cfg


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The checkpoint's tokenizer (transformers ``AutoTokenizer``, local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
