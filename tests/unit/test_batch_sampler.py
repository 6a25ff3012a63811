"""Batched sampler: each option does what it says, and seeds are independent of batch-mates."""

import math

import pytest
import torch

from qalora_runtime.sampling_params import SamplingParams
from qalora_runtime.worker.batch_sampler import SamplingRow, sample

V = 50


def row(gen_seed=None, prompt=(1, 2, 3), output=(), eos=(0,), **kw):
    gen = torch.Generator().manual_seed(gen_seed) if gen_seed is not None else None
    return SamplingRow(SamplingParams(**kw), list(prompt), list(output), gen, eos)


def logits_fixture(b=4, seed=0):
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    lg = logits_fixture()
    out = sample(lg, [row(temperature=0.0) for _ in range(4)])
    assert [o.token_id for o in out] == lg.argmax(-1).tolist()


def test_seeded_rows_ignore_batch_mates():
    lg = logits_fixture(1)
    alone = [sample(lg, [r])[0].token_id for r in [row(gen_seed=7, temperature=1.0)] for _ in range(1)]
    r = row(gen_seed=7, temperature=1.0)
    seq_alone = [sample(lg, [r])[0].token_id for _ in range(20)]
    r = row(gen_seed=7, temperature=1.0)
    others = [row(temperature=1.0), row(gen_seed=3, temperature=0.7)]
    big = torch.cat([logits_fixture(1, seed=5), lg, logits_fixture(1, seed=6)])
    seq_batched = [sample(big, [others[0], r, others[1]])[1].token_id for _ in range(20)]
    assert seq_alone == seq_batched
    assert alone[0] == seq_alone[0]
    assert len(set(seq_alone)) > 1  # really sampling, not argmax


def test_sampling_follows_the_distribution():
    lg = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)] + [-math.inf] * (V - 3)])
    r = row(gen_seed=0, temperature=1.0)
    counts = torch.bincount(torch.tensor([sample(lg, [r])[0].token_id for _ in range(3000)]), minlength=3)
    freq = counts[:3].float() / 3000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04), freq


def test_top_k_one_and_tiny_top_p_are_greedy():
    lg = logits_fixture()
    want = lg.argmax(-1).tolist()
    assert [o.token_id for o in sample(lg, [row(gen_seed=i, top_k=1) for i in range(4)])] == want
    assert [o.token_id for o in sample(lg, [row(gen_seed=i, top_p=1e-6) for i in range(4)])] == want


def test_top_k_restricts_support():
    lg = logits_fixture(1)
    top3 = set(lg[0].topk(3).indices.tolist())
    r = row(gen_seed=1, top_k=3, temperature=5.0)
    assert {sample(lg, [r])[0].token_id for _ in range(200)} <= top3


def test_min_p_restricts_support():
    lg = torch.full((1, V), -10.0)
    lg[0, 4], lg[0, 9] = 5.0, 4.0  # p(9)/p(4) = e^-1 ~ 0.37
    r = row(gen_seed=2, min_p=0.5)
    assert {sample(lg, [r])[0].token_id for _ in range(100)} == {4}


def test_logit_bias_and_min_tokens():
    lg = torch.zeros(1, V)
    lg[0, 0] = 10.0  # eos
    assert sample(lg, [row(temperature=0.0)])[0].token_id == 0
    assert sample(lg, [row(temperature=0.0, min_tokens=2)])[0].token_id != 0
    assert sample(lg, [row(temperature=0.0, min_tokens=2, output=(5, 6))])[0].token_id == 0
    assert sample(lg, [row(temperature=0.0, logit_bias={7: 100})])[0].token_id == 7


def test_penalties():
    lg = torch.zeros(1, V)
    lg[0, 3], lg[0, 8] = 2.0, 1.5
    assert sample(lg, [row(temperature=0.0, prompt=(3,), repetition_penalty=2.0)])[0].token_id == 8
    assert sample(lg, [row(temperature=0.0, output=(3,), presence_penalty=1.0)])[0].token_id == 8
    assert sample(lg, [row(temperature=0.0, output=(3,), frequency_penalty=0.4)])[0].token_id == 3
    assert sample(lg, [row(temperature=0.0, output=(3, 3), frequency_penalty=0.4)])[0].token_id == 8


def test_logprobs_are_of_the_raw_distribution():
    lg = logits_fixture(2)
    out = sample(lg, [row(temperature=0.0, logprobs=3), row(temperature=0.0)])
    logp = lg.log_softmax(-1)
    assert out[0].logprob == pytest.approx(float(logp[0].max()), abs=1e-6)
    assert [t for t, _ in out[0].top_logprobs] == logp[0].topk(3).indices.tolist()
    assert out[1].logprob is None and out[1].top_logprobs is None


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 logit rows for 1"):
        sample(torch.zeros(2, V), [row()])
