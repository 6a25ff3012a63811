"""End-to-end effect of the plane layout: fp32 decode of a 2/3-bit SmolLM2, plane vs quad layout, one process.

The default model is 4-bit (with an 8-bit head), which the plane layout does not
touch. This script re-quantizes it to ``--bits`` (2 or 3; round-to-nearest from the
dequantized default weights, head and embedding 8-bit) into ``--work``, loads it
twice in fp32 (once as served, with 2/3-bit layers in the plane layout, once with
the quad layout forced) and times greedy single-stream decode alternately.

    .venv/bin/python scripts/bench_layouts.py --bits 3 [--tokens 64] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import PROMPT, bench_qalora, hf_reference  # noqa: E402

from qalora_runtime.formats.default_model import ensure_default_model  # noqa: E402
from qalora_runtime.kernels import cpu_fused  # noqa: E402
from qalora_runtime.models.loader import load_tokenizer  # noqa: E402


def requantized(bits: int, work: Path) -> Path:
    """The default model re-quantized to ``bits`` under ``work`` (built once)."""
    out = work / f"smollm2-{bits}bit"
    if (out / "config.json").exists():
        return out
    src = ensure_default_model()
    float_dir = work / "smollm2-float"
    if not (float_dir / "config.json").exists():
        hf_reference(src, torch.float32).save_pretrained(str(float_dir))
        for f in src.iterdir():  # tokenizer files next to the float weights
            if f.name.startswith(("tokenizer", "special_tokens", "generation", "chat_template")):
                shutil.copy(f, float_dir / f.name)
    subprocess.run([sys.executable, "-m", "qalora_runtime", "quantize", "--bits", str(bits), "--group-size", "32",
                    "--embed-bits", "8", str(float_dir), str(out)], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, choices=(2, 3), default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="alternations (best of each layout is reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qalora-bench-layouts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = requantized(args.bits, args.work)
    tok = load_tokenizer(ensure_default_model())  # the same tokenizer, with its chat template
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    if not isinstance(prompt_ids, list):
        prompt_ids = list(prompt_ids["input_ids"])
    forced_quad = staticmethod(lambda spec, dtype: False)
    plane_rule = cpu_fused.uses_plane_layout
    best = {"plane": 0.0, "quad": 0.0}
    for _ in range(args.repeats):
        for layout in ("plane", "quad"):
            cpu_fused.uses_plane_layout = plane_rule if layout == "plane" else forced_quad.__func__
            rate, _ = bench_qalora(model_dir, prompt_ids, args.tokens, "float32", 1)
            best[layout] = max(best[layout], rate)
            print(f"{args.bits}-bit fp32, {layout} layout: {rate:.1f} tok/s", flush=True)
    cpu_fused.uses_plane_layout = plane_rule
    print(f"\n| {args.bits}-bit SmolLM2, fp32, {args.threads} thread(s) | decode tok/s (best of {args.repeats}) |")
    print("|---|---|")
    for layout, rate in best.items():
        print(f"| {layout} layout | {rate:.1f} |")
    print(f"| plane / quad | {best['plane'] / best['quad']:.2f}x |")


if __name__ == "__main__":
    main()
