"""Batched sampling with per-request options: penalties, logit bias, top-k/top-p/min-p, seeds, logprobs.

One call processes the logits of every request that samples this step. Each
option is applied only when some row uses it, so a plain greedy batch costs
one ``argmax``. Sampling uses the exponential-race trick
(``argmax(p / Exp(1))`` is a draw from ``p``) so a seeded request draws its
noise from its own ``torch.Generator`` and gets the same tokens whatever else
is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request at this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # set for seeded requests
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class SampledToken:
    """The sampled token of one row, with logprobs when the request asked for them."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition (prompt + output), frequency and presence (output only) penalties, in place."""
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
            if seen.numel():
                seen = seen[seen < vocab]
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
            out = torch.tensor(row.output_token_ids, dtype=torch.long)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _apply_bias_and_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if 0 <= t < vocab], dtype=torch.long)
            vals = torch.tensor([p.logit_bias[t] for t in p.logit_bias if 0 <= t < vocab], dtype=logits.dtype)
            logits[i, ids] += vals
        if len(row.output_token_ids) < p.min_tokens:
            banned = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                banned |= set(row.eos_token_ids)
            banned_ids = [t for t in banned if 0 <= t < vocab]
            if banned_ids:
                logits[i, banned_ids] = float("-inf")


def _apply_truncation(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """top-k, top-p and min-p masking (to -inf) on temperature-scaled logits."""
    vocab = logits.shape[1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in (r.params for r in rows)])
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=logits.dtype)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=logits.dtype)
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab).expand_as(sorted_logits)
        drop = rank >= top_k.unsqueeze(1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
    """Sample one token per row of ``logits[B, V]`` according to each row's SamplingParams."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"got {logits.shape[0]} logit rows for {len(rows)} requests")
    raw = logits.float()
    logits = raw.clone()
    if any(r.params.repetition_penalty != 1.0 or r.params.frequency_penalty or r.params.presence_penalty for r in rows):
        _apply_penalties(logits, rows)
    if any(r.params.logit_bias or r.params.min_tokens for r in rows):
        _apply_bias_and_min_tokens(logits, rows)

    greedy = torch.tensor([r.params.temperature == 0.0 for r in rows])
    chosen = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        temps = torch.tensor([r.params.temperature or 1.0 for r in rows], dtype=logits.dtype)
        scaled = _apply_truncation(logits / temps.unsqueeze(1), rows)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_()
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i] = torch.empty(probs.shape[1]).exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        chosen = torch.where(greedy, chosen, sampled)

    token_ids = chosen.tolist()
    out = [SampledToken(t) for t in token_ids]
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if want:
        # Logprobs of the model's own distribution (before penalties/temperature), as vLLM reports by default.
        logp = raw[want].log_softmax(dim=-1)
        k = max(rows[i].params.logprobs for i in want)
        top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (None, None)
        for j, i in enumerate(want):
            out[i].logprob = float(logp[j, token_ids[i]])
            n = rows[i].params.logprobs
            out[i].top_logprobs = (
                list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist())) if n and top_ids is not None else []
            )
    return out
