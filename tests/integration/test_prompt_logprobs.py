"""Prompt logprobs on the real model: chunked prefill, prefix-cache bypass, n > 1, against one direct forward.

The reference is the model run once over the whole prompt (one chunk, every row's
logits) in fp32; the engine computes the same rows in chunks of 8 tokens, so
values agree to fp32 accumulation-order noise (bound 1e-3 on logprobs of
magnitude 1-20). Top-k ids are compared only where the reference's k-th and
(k+1)-th logprobs differ by more than that bound.
"""

from __future__ import annotations

import pytest
import torch

from qalora_runtime.engine.builder import assemble_engine_core
from qalora_runtime.engine.simple_generate import blocks_needed
from qalora_runtime.models.loader import load_model, load_tokenizer
from qalora_runtime.sampling_params import SamplingParams
from qalora_runtime.worker.kv_cache import KVCache
from qalora_runtime.worker.model_runner import ModelRunner, SequenceInput

pytestmark = pytest.mark.slow

TEXT = "The quick brown fox jumps over the lazy dog because it wanted to see what was on the other side."
TOL = 1e-3


@pytest.fixture(scope="module")
def loaded(smollm2_dir):
    net, cfg = load_model(smollm2_dir, "fp32")
    return net, cfg, load_tokenizer(smollm2_dir), smollm2_dir


@pytest.fixture(scope="module")
def reference(loaded):
    """Prompt ids and log_softmax of every prompt row, from one unchunked forward."""
    net, cfg, tok, _ = loaded
    ids = tok.encode(TEXT)
    table = list(range(blocks_needed(len(ids) + 1, 16)))
    runner = ModelRunner(net, KVCache.for_model(cfg, len(table), 16, net.dtype), 16)
    logits = runner.execute([SequenceInput(ids, 0, table, sample=True, all_logits=True)])
    assert logits.shape[0] == len(ids)
    return ids, torch.log_softmax(logits.double(), dim=-1)


def _engine(loaded, **kw):
    net, cfg, tok, path = loaded
    return assemble_engine_core(net, cfg, tok, path, max_model_len=256, kv_cache_memory_bytes=32 << 20, **kw)


def _run(engine, requests):
    """Step to the end; per request id: (prompt_logprobs as first reported, number of reports, output ids)."""
    for rid, ids, params in requests:
        engine.add_request(rid, ids, params)
    seen: dict[str, list] = {rid: [None, 0, []] for rid, _, _ in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                seen[out.request_id][1] += 1
                seen[out.request_id][0] = seen[out.request_id][0] or out.prompt_logprobs
            for co in out.outputs:
                if co.index == 0:
                    seen[out.request_id][2].extend(co.token_ids_delta)
    return seen


def _check(prompt_lps, ids, ref, top_k):
    assert len(prompt_lps) == len(ids) and prompt_lps[0] is None
    for t in range(1, len(ids)):
        pos = prompt_lps[t]
        row = ref[t - 1]  # the output at position t-1 predicts token t
        assert pos.sampled.token_id == ids[t]
        assert abs(pos.sampled.logprob - row[ids[t]].item()) < TOL
        assert len(pos.top) == top_k
        values, indices = row.topk(top_k + 1)
        for j in range(top_k):
            assert abs(pos.top[j].logprob - values[j].item()) < TOL
            if values[j] - values[j + 1] > TOL and (j == 0 or values[j - 1] - values[j] > TOL):
                assert pos.top[j].token_id == indices[j].item()


def test_prompt_logprobs_in_chunks_match_one_forward(loaded, reference):
    ids, ref = reference
    engine = _engine(loaded, max_num_batched_tokens=8)  # the prompt prefills in several chunks
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    seen = _run(engine, [("a", ids, params)])
    prompt_lps, reports, _ = seen["a"]
    assert reports == 1  # sent once, with the first output
    _check(prompt_lps, ids, ref, 3)


def test_prompt_logprobs_bypass_the_prefix_cache(loaded, reference):
    ids, ref = reference
    engine = _engine(loaded, enable_prefix_caching=True)
    plain = SamplingParams(temperature=0.0, max_tokens=1)
    _run(engine, [("warm", ids, plain)])  # now the prompt's full blocks are cached
    hits_before = engine.scheduler.kv.prefix_cache_hits
    seen = _run(engine, [("scored", ids, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))])
    _check(seen["scored"][0], ids, ref, 0)
    assert engine.scheduler.kv.prefix_cache_hits == hits_before
    # A request without prompt logprobs still hits the cache afterwards.
    _run(engine, [("again", ids, plain)])
    assert engine.scheduler.kv.prefix_cache_hits > hits_before


def test_prompt_logprobs_with_n_and_alongside_other_requests(loaded, reference):
    ids, ref = reference
    engine = _engine(loaded, max_num_batched_tokens=16)
    other = loaded[2].encode("Once upon a time")
    seen = _run(engine, [
        ("n2", ids, SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=3, prompt_logprobs=1)),
        ("plain", other, SamplingParams(temperature=0.0, max_tokens=3)),
    ])
    assert seen["n2"][1] == 1
    _check(seen["n2"][0], ids, ref, 1)
    assert seen["plain"][0] is None and len(seen["plain"][2]) == 3


def test_prompt_logprobs_validation():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=True)
