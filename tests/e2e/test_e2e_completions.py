"""Legacy completions through the official openai client on a real server."""

from __future__ import annotations

import asyncio

import openai
from conftest import MODEL_NAME

PROMPT = "The capital of France is"


def test_completion_sync(client: openai.OpenAI, http) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    n_prompt = http.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens <= 10


def test_completion_stream_with_usage_matches(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage == full.usage


def test_completion_batch_echo_and_n(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, "One, two, three,"], max_tokens=4, n=2,
                                  echo=True, temperature=0.8, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith(PROMPT) and r.choices[3].text.startswith("One, two, three,")


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens).startswith(r.choices[0].text[:1]) or not r.choices[0].text
    assert lp.text_offset[0] == 0 and all(x <= 0 for x in lp.token_logprobs)


def test_completion_echo_logprobs_scores_the_prompt(client: openai.OpenAI, http) -> None:
    """What lm-eval-harness's loglikelihood sends: echo + logprobs (+ one generated token)."""
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1, echo=True)
    r = client.completions.create(**kwargs)
    n_prompt = http.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == PROMPT and r.choices[0].text.startswith(PROMPT)
    assert lp.text_offset[0] == 0 and lp.text_offset[n_prompt] == len(PROMPT)
    # "Paris" after "The capital of France is" is far likelier than a token-level coin flip.
    assert lp.token_logprobs[-1] > -3
    # The same numbers when streamed: the echoed prompt frame carries the prompt's logprobs.
    chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert chunks[0].choices[0].text == PROMPT
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and len(streamed) == n_prompt + 1
    assert all(abs(a - b) < 1e-4 for a, b in zip(streamed[1:], lp.token_logprobs[1:]))


def test_completion_async_stream(async_client: openai.AsyncOpenAI) -> None:
    async def run() -> str:
        stream = await async_client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    assert asyncio.run(run())


def test_completion_token_id_prompt(client: openai.OpenAI, http) -> None:
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
