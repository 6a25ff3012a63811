"""Engine benchmarks on the default model: batching throughput, prefix caching, chunked prefill.

Runs the engine core in-process (no HTTP) so the numbers are the engine's own:

1. aggregate output tokens/s at 1, 4, 16, 32, 64 concurrent sequences
   (each generates ``--tokens`` tokens after a short prompt), and the ratio to
   the single-stream rate;
2. time to first token of requests sharing a long system prompt, with prefix
   caching on and off;
3. inter-token latency of running decodes while a ~2,000-token prompt arrives,
   with chunked prefill (budget ``--chunk``) and without (whole prompt in one step).

Usage: python scripts/bench_engine.py [--dtype bf16] [--tokens 64] [--concurrency 1 4 16 32 64]

``--gemm-min-m 12 32 --repeats 2`` instead runs the throughput section once per
value of cpu_fused's ``GEMM_MIN_M`` for the model's layout, alternating, in one
process (an A/B of the GEMV/GEMM switch point on the same loaded model).
"""

from __future__ import annotations

import argparse
import statistics
import time

from qalora_runtime.engine.builder import assemble_engine_core
from qalora_runtime.formats.default_model import ensure_default_model
from qalora_runtime.models.loader import load_model, load_tokenizer
from qalora_runtime.quant.spec import QuantSpec
from qalora_runtime.sampling_params import SamplingParams

STORY = "Once upon a time, in a small village at the edge of a dark forest, there lived"


def throughput(loaded, concurrency: list[int], tokens: int) -> list[tuple[int, float, float]]:
    net, cfg, tok, path = loaded
    rows = []
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for c in concurrency:
        eng = assemble_engine_core(net, cfg, tok, path, max_model_len=512, max_num_seqs=max(c, 1),
                                   kv_cache_memory_bytes=512 << 20)
        for i in range(c):
            eng.add_request(f"r{i}", tok.encode(f"{STORY} {i}"), params)
        start = time.perf_counter()
        generated = 0
        while eng.has_unfinished_requests():
            generated += sum(len(o.token_ids_delta) for out in eng.step() for o in out.outputs)
        elapsed = time.perf_counter() - start
        rows.append((c, generated / elapsed, elapsed))
    return rows


def prefix_ttft(loaded, system_tokens: int, requests: int) -> list[tuple[str, float, float]]:
    net, cfg, tok, path = loaded
    system = (STORY + " ") * (system_tokens // len(tok.encode(STORY + " ")) + 1)
    system_ids = tok.encode(system)[:system_tokens]
    rows = []
    for caching in (False, True):
        eng = assemble_engine_core(net, cfg, tok, path, max_model_len=4096, enable_prefix_caching=caching,
                                   kv_cache_memory_bytes=512 << 20)
        ttfts = []
        for i in range(requests):
            ids = system_ids + tok.encode(f" Question {i}: what happened next?")
            start = time.perf_counter()
            eng.add_request(f"q{i}", ids, SamplingParams(temperature=0.0, max_tokens=1))
            while eng.has_unfinished_requests():
                eng.step()
            ttfts.append(time.perf_counter() - start)
        # The first request always misses; report the mean of the rest.
        rows.append(("on" if caching else "off", ttfts[0], statistics.mean(ttfts[1:])))
    return rows


def itl_during_long_prompt(loaded, prompt_tokens: int, chunk: int, decodes: int) -> list[tuple[str, float, float, float]]:
    net, cfg, tok, path = loaded
    long_ids = (tok.encode(STORY + " ") * (prompt_tokens // 10 + 1))[:prompt_tokens]
    rows = []
    for chunked in (True, False):
        budget = chunk if chunked else 4096
        eng = assemble_engine_core(net, cfg, tok, path, max_model_len=4096, enable_chunked_prefill=chunked,
                                   max_num_batched_tokens=budget, kv_cache_memory_bytes=512 << 20)
        params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
        for i in range(decodes):
            eng.add_request(f"d{i}", tok.encode(f"{STORY} {i}"), params)
        for _ in range(3):
            eng.step()
        eng.add_request("long", long_ids, SamplingParams(temperature=0.0, max_tokens=1))
        gaps = []
        last = time.perf_counter()
        while True:
            outs = eng.step()
            now = time.perf_counter()
            if any(o.request_id.startswith("d") for o in outs):
                gaps.append(now - last)
                last = now
            if any(o.request_id == "long" and o.finished for o in outs):
                break
        for rid in [f"d{i}" for i in range(decodes)]:
            eng.abort_request(rid)
        rows.append(("chunked (budget %d)" % chunk if chunked else "unchunked", statistics.median(gaps), max(gaps),
                     sum(gaps)))
    return rows


def gemm_switch_ab(loaded, concurrency: list[int], tokens: int, values: list[int], repeats: int) -> None:
    """Throughput per value of ``GEMM_MIN_M`` of the model's layout, the values alternating ``repeats`` times."""
    from qalora_runtime.kernels import cpu_fused

    # The default model is 4/8-bit: the dot layout in bf16, the quad layout in fp32.
    key = cpu_fused.layout_for(QuantSpec(4, 32), loaded[0].dtype)
    kept = cpu_fused.gemm_min_m(key, loaded[0].dtype)
    print("\n| GEMM_MIN_M | " + " | ".join(f"c{c} tok/s" for c in concurrency) + " |")
    print("|---|" + "---|" * len(concurrency))
    try:
        for _ in range(repeats):
            for value in values:
                cpu_fused.set_gemm_min_m(key, loaded[0].dtype, value)
                rows = throughput(loaded, concurrency, tokens)
                print(f"| {value} | " + " | ".join(f"{tps:.1f}" for _, tps, _ in rows) + " |", flush=True)
    finally:
        cpu_fused.set_gemm_min_m(key, loaded[0].dtype, kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--long-prompt", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "prefix", "chunked"])
    ap.add_argument("--gemm-min-m", type=int, nargs="+", default=None,
                    help="A/B the cpu_fused GEMV->GEMM switch M (throughput section only)")
    ap.add_argument("--repeats", type=int, default=1, help="alternations of the --gemm-min-m values")
    args = ap.parse_args()
    if args.gemm_min_m and any(v < 1 for v in args.gemm_min_m):
        ap.error("--gemm-min-m values must be >= 1")
    path = ensure_default_model()
    net, cfg = load_model(path, args.dtype)
    loaded = (net, cfg, load_tokenizer(path), path)
    print(f"model {path.name}, dtype {net.dtype}")
    if args.gemm_min_m:
        gemm_switch_ab(loaded, args.concurrency, args.tokens, args.gemm_min_m, args.repeats)
        return
    if "throughput" not in args.skip:
        rows = throughput(loaded, args.concurrency, args.tokens)
        base = rows[0][1]
        print(f"\n| concurrent sequences | output tok/s | x single stream |\n|---|---|---|")
        for c, tps, _ in rows:
            print(f"| {c} | {tps:.1f} | {tps / base:.2f} |")
    if "prefix" not in args.skip:
        print(f"\n| prefix caching | TTFT first request (s) | mean TTFT of later requests (s) |\n|---|---|---|")
        for mode, first, rest in prefix_ttft(loaded, args.system_tokens, 5):
            print(f"| {mode} | {first:.3f} | {rest:.3f} |")
    if "chunked" not in args.skip:
        print(f"\n| prefill mode | median ITL (s) | max ITL (s) | decode time while prompt prefills (s) |\n|---|---|---|---|")
        for mode, med, worst, total in itl_during_long_prompt(loaded, args.long_prompt, args.chunk, 4):
            print(f"| {mode} | {med:.3f} | {worst:.3f} | {total:.2f} |")


if __name__ == "__main__":
    main()
