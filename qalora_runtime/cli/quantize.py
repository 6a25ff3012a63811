"""`qalora quantize`: a float Hugging Face checkpoint -> merged format by RTN group quantization."""

from __future__ import annotations

import argparse
import logging

from ..formats.quantize_model import HIGH_PRECISION_BITS, SUPPORTED_GROUP_SIZES, quantize_model
from ..quant.spec import SUPPORTED_BITS

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `quantize` subcommand."""
    p = subparsers.add_parser(
        "quantize",
        help="quantize a float HF safetensors checkpoint (RTN, float zeros)",
        description=(
            "Round-to-nearest asymmetric group quantization with float zero-points of every linear "
            "layer under model.layers (no calibration; GPTQ-quality quantization is not implemented)."
        ),
    )
    p.add_argument("src", help="float Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4, help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, choices=SUPPORTED_GROUP_SIZES, default=128,
                   help="inputs per quantization group (default 128)")
    p.add_argument("--embed-bits", type=int, choices=HIGH_PRECISION_BITS, default=16,
                   help="embedding precision: 16 (kept as is) or 8 (8-bit, group 32); default 16")
    p.add_argument("--lm-head-bits", type=int, choices=HIGH_PRECISION_BITS, default=None,
                   help="untied lm_head precision, 16 or 8; default: same as --embed-bits")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Quantize ``args.src`` into ``args.out``."""
    out = quantize_model(args.src, args.out, args.bits, args.group_size, args.embed_bits, args.lm_head_bits)
    print(f"wrote {args.bits}-bit group-{args.group_size} checkpoint to {out}")
    return 0
