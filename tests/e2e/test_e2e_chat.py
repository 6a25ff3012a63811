"""Chat completions through the official openai client (sync, async, streamed and not) on a real server."""

from __future__ import annotations

import asyncio

import openai
from conftest import MODEL_NAME
from server_process import fake_mode

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def prompt_tokens(http, messages) -> int:
    return http.post("/tokenize", json={"messages": messages}).json()["count"]


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_chat_sync_non_streamed(client: openai.OpenAI, http) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == prompt_tokens(http, MESSAGES)
    assert 0 < r.usage.completion_tokens <= 24
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_streamed_greedy(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_chat_async_streamed_and_not(async_client: openai.AsyncOpenAI) -> None:
    async def run() -> None:
        r = await async_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8)
        assert r.choices[0].message.content
        stream = await async_client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=8, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts)

    asyncio.run(run())


def test_chat_stop_string(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=30, temperature=0)
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    r = client.chat.completions.create(**kwargs, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]
    streamed = client.chat.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content


def test_chat_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, n=3, temperature=1.0,
                                       seed=11)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert 3 <= r.usage.completion_tokens <= 36
    if all(c.finish_reason == "length" for c in r.choices):
        assert r.usage.completion_tokens == 36


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content[:1])
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # Greedy: the sampled token is the most likely one.
        assert abs(t.logprob - max(x.logprob for x in t.top_logprobs)) < 1e-4


def test_chat_seed_reproducible(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=1.0)
    a = client.chat.completions.create(**kwargs, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kwargs, seed=1234).choices[0].message.content
    assert a == b
    if not fake_mode():
        others = {client.chat.completions.create(**kwargs, seed=s).choices[0].message.content for s in (1, 2, 3)}
        assert others - {a}, "different seeds never changed the sample"
