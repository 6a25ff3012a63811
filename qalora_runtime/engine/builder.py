"""Wire an EngineCore from a model name or path: load weights, size the KV cache, build the scheduler."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..config import CacheConfig, SchedulerConfig
from ..core.scheduler import Scheduler
from ..formats.default_model import resolve_model
from ..models.config import DecoderConfig
from ..models.llama import DecoderForCausalLM
from ..models.loader import load_model, load_tokenizer
from ..quant.linear import PackedLinear
from ..worker.kv_cache import KVCache
from ..worker.model_runner import ModelRunner
from .engine_core import EngineCore
from .protocol import ModelInfo

logger = logging.getLogger(__name__)

DEFAULT_KV_CACHE_BYTES = 1 << 30


def _eos_token_ids(path: Path, config_eos: tuple[int, ...], tokenizer: Any) -> tuple[int, ...]:
    """EOS ids from config.json, generation_config.json and the tokenizer, united."""
    ids = set(config_eos)
    gen = path / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(int(i) for i in ids))


def _kernel_names(model: torch.nn.Module) -> str:
    names = sorted({m.kernel.name for m in model.modules() if isinstance(m, PackedLinear)})
    return ",".join(names) or "dense"


def build_engine_core(
    model: str | None = None,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    max_model_len: int | None = None,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    block_size: int = 16,
    kv_cache_memory_bytes: int | None = None,
    enable_prefix_caching: bool = True,
    enable_chunked_prefill: bool = True,
    chat_template: str | None = None,
    served_model_name: str | None = None,
) -> EngineCore:
    """Load ``model`` (None = default model; a merged dir or a .gguf file) into a ready EngineCore."""
    path = resolve_model(model)
    net, cfg = load_model(path, dtype, device)
    tokenizer = load_tokenizer(path)
    if chat_template is not None:
        template_file = Path(chat_template)
        tokenizer.chat_template = template_file.read_text() if template_file.is_file() else chat_template
    return assemble_engine_core(
        net, cfg, tokenizer, path,
        device=device, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
        kv_cache_memory_bytes=kv_cache_memory_bytes, enable_prefix_caching=enable_prefix_caching,
        enable_chunked_prefill=enable_chunked_prefill, served_model_name=served_model_name,
    )


def assemble_engine_core(
    net: DecoderForCausalLM,
    cfg: DecoderConfig,
    tokenizer: Any,
    path: Path,
    *,
    device: str = "cpu",
    max_model_len: int | None = None,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    block_size: int = 16,
    kv_cache_memory_bytes: int | None = None,
    enable_prefix_caching: bool = True,
    enable_chunked_prefill: bool = True,
    served_model_name: str | None = None,
) -> EngineCore:
    """Build a fresh KV cache, scheduler and runner around an already loaded model.

    Several engines may share one loaded model (tests do, to try cache sizes
    without reloading); each has its own KV cache and scheduler.
    """
    compute_dtype: torch.dtype = net.dtype
    per_block = KVCache.bytes_per_block(cfg, block_size, compute_dtype)
    budget = kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES
    num_blocks = budget // per_block
    if num_blocks < 2:
        raise ValueError(
            f"kv cache memory {budget} bytes holds {num_blocks} blocks of {block_size} tokens "
            f"({per_block} bytes each); give at least {2 * per_block} bytes"
        )
    model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    kv = KVCache.for_model(cfg, num_blocks, block_size, compute_dtype, device)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
            max_model_len=model_len,
            enable_chunked_prefill=enable_chunked_prefill,
        ),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching),
    )
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    info = ModelInfo(
        name=served_model_name or path.name,
        path=str(path),
        architecture=cfg.architecture,
        max_model_len=scheduler.max_model_len,
        bits=int(quant["bits"]),
        group_size=int(quant["group_size"]),
        kernel=_kernel_names(net),
        dtype=str(compute_dtype).removeprefix("torch."),
        device=str(device),
    )
    logger.info(
        "engine: %s, %d KV blocks x %d tokens (%.0f MiB), max_model_len %d, kernels %s",
        info.name, num_blocks, block_size, kv.nbytes() / 2**20, info.max_model_len, info.kernel,
    )
    runner = ModelRunner(net, kv, block_size)
    eos = _eos_token_ids(path, cfg.eos_token_ids, tokenizer)
    return EngineCore(scheduler, runner, tokenizer, info, eos, cfg.vocab_size)
