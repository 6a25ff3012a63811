"""Single-stream decode speed of the default model: qalora vs transformers vs llama.cpp, same run.

    .venv/bin/python scripts/bench_decode.py [--tokens 128] [--repeats 3] [--threads 2] [--prompt-tokens 900]

Every engine decodes greedily from the same prompt (the SmolLM2 chat template
around a short question, repeated until the prompt has ``--prompt-tokens``
tokens, which makes attention a larger part of a step) for ``--tokens`` tokens after a prefill; the table
shows decode tokens/s (prefill excluded; best of ``--repeats``). transformers
runs the same weights, dequantized from our checkpoint (fp32 and bf16);
llama.cpp (``llama-cpp-python``, optional) reads the original GGUF.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def best_rate(run: Callable[[], float], repeats: int) -> float:
    """Best tokens/s over ``repeats`` runs of ``run`` (which returns tokens/s)."""
    return max(run() for _ in range(repeats))


def bench_qalora(model_dir, prompt_ids: list[int], tokens: int, dtype: str, repeats: int) -> tuple[float, str]:
    from qalora_runtime.engine.simple_generate import blocks_needed
    from qalora_runtime.models.loader import load_model
    from qalora_runtime.quant.linear import PackedLinear
    from qalora_runtime.worker.kv_cache import KVCache
    from qalora_runtime.worker.model_runner import ModelRunner, SequenceInput

    model, cfg = load_model(model_dir, dtype)
    kernels = ",".join(sorted({m.kernel.name for m in model.modules() if isinstance(m, PackedLinear)}))
    block = 16
    table = list(range(blocks_needed(len(prompt_ids) + tokens + 1, block)))
    runner = ModelRunner(model, KVCache.for_model(cfg, len(table), block, model.dtype), block)

    def run() -> float:
        tok = int(runner.execute([SequenceInput(prompt_ids, 0, table)])[0].argmax())
        start = time.perf_counter()
        for i in range(tokens):
            logits = runner.execute([SequenceInput([tok], len(prompt_ids) + i, table)])
            tok = int(logits[0].argmax())
        return tokens / (time.perf_counter() - start)

    run()  # warm-up
    return best_rate(run, repeats), kernels


def hf_reference(model_dir, dtype: torch.dtype):
    """transformers LlamaForCausalLM with our checkpoint's weights, dequantized."""
    import transformers

    from qalora_runtime.formats.checkpoint import MergedCheckpoint
    from qalora_runtime.kernels.reference import dequantize

    ckpt = MergedCheckpoint(model_dir)
    cfg = transformers.LlamaConfig(**{k: v for k, v in ckpt.config.items() if k != "quantization_config"})
    model = transformers.LlamaForCausalLM(cfg)
    state = {}
    for name in model.state_dict():
        module = name.rsplit(".", 1)[0]
        if name == "lm_head.weight":
            continue
        if ckpt.is_quantized(module):
            q = ckpt.quantized(module)
            state[name] = dequantize(q.qweight, q.scales, q.zeros, q.spec, torch.float32).t()
        else:
            state[name] = ckpt.tensor(name).float()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.to(dtype).eval()


def _cache(out):
    # transformers 5 renamed past_key_values to cache; support both.
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _cache_arg() -> str:
    import inspect

    import transformers

    params = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def bench_hf(model, prompt_ids: list[int], tokens: int, repeats: int) -> float:
    ids = torch.tensor([prompt_ids])
    cache_arg = _cache_arg()

    @torch.inference_mode()
    def run() -> float:
        out = model(ids, use_cache=True)
        cache, tok = _cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(tok, **{cache_arg: cache}, use_cache=True)
            cache, tok = _cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
        return tokens / (time.perf_counter() - start)

    run()
    return best_rate(run, repeats)


def bench_llama_cpp(gguf_path, prompt_ids: list[int], tokens: int, threads: int, repeats: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    n_ctx = max(1024, len(prompt_ids) + tokens + 16)
    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False)

    def run() -> float:
        llm.reset()
        gen = llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True)
        next(gen)  # prefill + first token
        start = time.perf_counter()
        for _ in range(tokens):
            next(gen)
        rate = tokens / (time.perf_counter() - start)
        gen.close()
        return rate

    run()
    return best_rate(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="decode tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine (best is reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads, all engines")
    parser.add_argument("--skip-hf", action="store_true", help="skip transformers")
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="repeat the question until the prompt is at least this long (default: once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from qalora_runtime.formats.default_model import (
        default_gguf_path,
        ensure_default_model,
    )
    from qalora_runtime.models.loader import load_tokenizer

    model_dir = ensure_default_model()
    tok = load_tokenizer(model_dir)
    question = PROMPT
    while True:
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        prompt_ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if len(prompt_ids) >= args.prompt_tokens:
            break
        question += " " + PROMPT

    rows: list[tuple[str, str, float | None]] = []
    for dtype in ("bf16", "fp32"):
        rate, kernels = bench_qalora(model_dir, prompt_ids, args.tokens, dtype, args.repeats)
        rows.append((f"qalora {dtype}", f"packed 4-bit linears, 8-bit head ({kernels})", rate))
    if not args.skip_hf:
        for dtype in (torch.float32, torch.bfloat16):
            model = hf_reference(model_dir, dtype)
            name = "fp32" if dtype == torch.float32 else "bf16"
            rows.append((f"transformers {name}", "dense, same dequantized weights", bench_hf(model, prompt_ids, args.tokens, args.repeats)))
            del model
    rate = bench_llama_cpp(default_gguf_path(), prompt_ids, args.tokens, args.threads, args.repeats)
    rows.append(("llama.cpp (llama-cpp-python)", "original GGUF (Q4_1 linears, Q8_0 embedding)", rate))

    print(f"SmolLM2-135M-Instruct, single stream, prompt {len(prompt_ids)} tokens, "
          f"{args.tokens} decode tokens, best of {args.repeats}, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    llama_rate = rows[-1][2]
    print(f"| {'engine':<30} | {'weights':<55} | {'decode tok/s':>12} | {'vs llama.cpp':>12} |")
    print(f"|{'-' * 32}|{'-' * 57}|{'-' * 14}|{'-' * 14}|")
    for name, what, rate in rows:
        shown = f"{rate:12.1f}" if rate is not None else f"{'not installed':>12}"
        ratio = f"{rate / llama_rate:11.2f}x" if rate and llama_rate else f"{'':>12}"
        print(f"| {name:<30} | {what:<55} | {shown} | {ratio} |")


if __name__ == "__main__":
    main()
