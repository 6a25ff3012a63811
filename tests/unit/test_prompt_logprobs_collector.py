"""PromptLogprobsCollector: chunk and slice boundaries, recomputed chunks, top-k, the first token."""

from __future__ import annotations

import torch

from qalora_runtime.engine.prompt_logprobs import PromptLogprobsCollector


def test_chunks_fill_every_position_once() -> None:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50, (600,), generator=gen).tolist()
    logits = torch.randn(600, 50, generator=gen)
    ref = torch.log_softmax(logits.double(), dim=-1)
    col = PromptLogprobsCollector(prompt, 2, lambda ids: f"<{ids[0]}>")
    col.add_chunk(0, logits[:300])  # more rows than one internal slice
    assert not col.complete
    col.add_chunk(0, logits[:10] + 5.0)  # a recomputed chunk (preemption) changes nothing already filled
    col.add_chunk(300, logits[300:])  # the last row predicts past the prompt: ignored
    assert col.complete
    out = col.result()
    assert len(out) == 600 and out[0] is None
    for t in (1, 255, 256, 257, 300, 599):
        pos = out[t]
        assert pos.sampled.token_id == prompt[t] and pos.sampled.text == f"<{prompt[t]}>"
        assert abs(pos.sampled.logprob - ref[t - 1, prompt[t]].item()) < 1e-5
        assert [x.token_id for x in pos.top] == ref[t - 1].topk(2).indices.tolist()


def test_single_token_prompt_is_complete_at_once() -> None:
    col = PromptLogprobsCollector([7], 0, lambda ids: "x")
    assert col.complete and col.result() == [None]
    col.add_chunk(0, torch.zeros(1, 10))  # nothing to score
    assert col.result() == [None]
