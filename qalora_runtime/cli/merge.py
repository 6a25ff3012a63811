"""`qalora merge`: fold a QA-LoRA adapter into a GPTQ or merged base model's float zero-points."""

from __future__ import annotations

import argparse

from ..formats.merge import merge_adapter
from ..formats.qalora_adapter import CONVENTIONS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `merge` subcommand."""
    p = subparsers.add_parser(
        "merge",
        help="merge a QA-LoRA adapter into a quantized model (exact zero-point fold)",
        description=(
            "Merge a PEFT QA-LoRA adapter (LoraConfig(use_qalora=True, qalora_group_size=L)) into a "
            "GPTQ checkpoint or a merged qalora checkpoint by shifting its float zero-points. Exact when "
            "L is a multiple of the base group size G; otherwise refused unless --requantize."
        ),
    )
    p.add_argument("--base", required=True, help="GPTQ checkpoint dir or merged qalora checkpoint dir")
    p.add_argument("--adapter", required=True, help="PEFT adapter dir (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--convention", choices=CONVENTIONS, default="peft",
                   help="pooling convention: peft (mean * K/L, PEFT's QALoraLinearVariant) or qalora "
                        "(plain mean, the original QA-LoRA code); default peft")
    p.add_argument("--requantize", action="store_true",
                   help="when L is not a multiple of G: dequantize, add the update and re-quantize (LOSSY; "
                        "the error is reported)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the merge and print its report."""
    report = merge_adapter(args.base, args.adapter, args.out, args.convention, args.requantize)
    print(report.summary())
    return 0
