"""`qalora convert SRC OUT`: a GGUF file or a GPTQ checkpoint directory -> merged format v1."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `convert` subcommand."""
    p = subparsers.add_parser(
        "convert",
        help="convert a GGUF file or a GPTQ checkpoint directory into the merged format",
        description=(
            "GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors; llama, mistral and qwen2 architectures) is "
            "converted without changing a dequantized weight beyond float32 rounding of Q4_1 zeros; "
            "tokenizer, chat template and config come from the GGUF metadata. GPTQ directories "
            "(AutoGPTQ/GPTQModel, checkpoint_format gptq or gptq_v2) keep their packed weights."
        ),
    )
    p.add_argument("src", help="a .gguf file or a GPTQ checkpoint directory")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Convert ``args.src`` into ``args.out``; user errors surface as ValueError/FileNotFoundError."""
    src = Path(args.src).expanduser()
    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise ValueError(f"{src} is not a .gguf file; SRC must be a .gguf file or a GPTQ checkpoint directory")
        from ..formats.gguf import convert_gguf

        out = convert_gguf(src, args.out, progress=not args.no_progress)
    elif src.is_dir():
        # imported here so `qalora convert` on GGUF works without the GPTQ importer's dependencies
        from ..formats.gptq import convert_gptq

        out = convert_gptq(src, args.out, progress=not args.no_progress)
    else:
        raise FileNotFoundError(f"{src} not found; SRC must be a .gguf file or a GPTQ checkpoint directory")
    print(f"wrote merged checkpoint to {out}")
    return 0
