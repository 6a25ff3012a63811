"""SSE frame format of chat and completion streams, against the scripted engine."""

from __future__ import annotations

import json

import pytest
from scripted_engine import ScriptedEngine, make_client

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}


def frames(text: str) -> list[str]:
    """The data payloads of an SSE body, asserting the `data: ...\\n\\n` framing."""
    assert text.endswith("\n\n"), text[-50:]
    events = text[:-2].split("\n\n")
    payloads = []
    for event in events:
        if event.startswith(":"):  # keep-alive comment
            continue
        assert event.startswith("data: ") and "\n" not in event, event
        payloads.append(event[len("data: "):])
    return payloads


@pytest.fixture()
def engine() -> ScriptedEngine:
    return ScriptedEngine(reply="Hi there")


@pytest.fixture()
def client(engine: ScriptedEngine):
    with make_client(engine) as c:
        yield c


def test_chat_stream_frames(client) -> None:
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    data = frames(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "scripted-model" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hi there"
    # finish_reason only on the last chunk, null before it; no usage without include_usage.
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert all("usage" not in c for c in chunks)


def test_chat_stream_finish_reason_on_last_content_chunk(client) -> None:
    chunks = [json.loads(d) for d in frames(client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 3}).text)[:-1]]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {"content": " "}, "logprobs": None,
                                        "finish_reason": "length"}


def test_chat_stream_include_usage(client) -> None:
    req = {**CHAT, "max_tokens": 4, "stream_options": {"include_usage": True}}
    data = frames(client.post("/v1/chat/completions", json=req).text)
    assert data[-1] == "[DONE]"
    usage_chunk = json.loads(data[-2])
    assert usage_chunk["choices"] == []
    prompt_len = len("<|user|>Hi\n<|assistant|>")
    assert usage_chunk["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 4,
                                    "total_tokens": prompt_len + 4}
    assert all("usage" not in json.loads(d) for d in data[:-2])


def test_chat_stream_n_and_logprobs(client) -> None:
    req = {**CHAT, "n": 2, "logprobs": True, "top_logprobs": 1, "max_tokens": 2}
    chunks = [json.loads(d) for d in frames(client.post("/v1/chat/completions", json=req).text)[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    by_index: dict[int, str] = {0: "", 1: ""}
    for c in chunks[2:]:
        choice = c["choices"][0]
        by_index[choice["index"]] += choice["delta"].get("content", "")
        assert choice["logprobs"]["content"][0]["top_logprobs"][0]["token"] == choice["delta"]["content"]
    assert by_index == {0: "Hi", 1: "Hi"}


def test_stream_holds_back_possible_stop_string(client) -> None:
    chunks = [json.loads(d) for d in frames(client.post(
        "/v1/chat/completions", json={**CHAT, "stop": ["there"]}).text)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hi "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_stream_echo_usage(client) -> None:
    req = {"prompt": "Say", "stream": True, "echo": True, "max_tokens": 3,
           "stream_options": {"include_usage": True}}
    data = frames(client.post("/v1/completions", json=req).text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "SayHi "
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_completion_stream_logprobs_offsets(client) -> None:
    req = {"prompt": "x", "stream": True, "logprobs": 0, "max_tokens": 3}
    chunks = [json.loads(d) for d in frames(client.post("/v1/completions", json=req).text)[:-1]]
    offsets = [c["choices"][0]["logprobs"]["text_offset"][0] for c in chunks]
    assert offsets == [0, 1, 2]
    assert chunks[0]["choices"][0]["logprobs"]["top_logprobs"] == [{"H": -0.25}]


def test_error_mid_stream_is_an_error_event_then_the_end() -> None:
    engine = ScriptedEngine(reply="abcdef", fail_after=3)
    with make_client(engine) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        # Failing at step 3 means the first output (step 1) succeeded: headers were sent.
        events = r.text[:-2].split("\n\n")
        assert events[-1].startswith("event: error\ndata: ")
        body = json.loads(events[-1].split("data: ", 1)[1])
        assert body["error"]["type"] == "server_error"
        assert "[DONE]" not in r.text
        assert engine.running == set()
        engine.fail_after = None
        assert c.post("/v1/chat/completions", json={**CHAT, "stream": False}).status_code == 200
