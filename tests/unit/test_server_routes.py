"""Every route of the HTTP server against the scripted engine: status codes and response bodies."""

from __future__ import annotations

import pytest
from scripted_engine import ScriptedEngine, make_client

CHAT = {"model": "scripted-model", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture()
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture()
def client(engine: ScriptedEngine):
    with make_client(engine) as c:
        yield c


def test_chat_completion_non_streamed(client, engine: ScriptedEngine) -> None:
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "scripted-model"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": engine.reply}, "logprobs": None,
         "finish_reason": "stop"}
    ]
    prompt_ids, params, _ = engine.submitted[-1]
    # Rendered with the chat template, no BOS added on top of the template's own text.
    assert engine.tokenizer.decode(prompt_ids) == "<|user|>Hi\n<|assistant|>"
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(engine.reply) + 1,
                             "total_tokens": len(prompt_ids) + len(engine.reply) + 1}
    # No max_tokens: the request may run to the end of the context.
    assert params.max_tokens == engine.model_info.max_model_len - len(prompt_ids)


def test_chat_text_parts_system_and_sampling_fields(client, engine: ScriptedEngine) -> None:
    req = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
            {"role": "assistant", "content": "Yes?"},
            {"role": "user", "content": "Go"},
        ],
        "max_completion_tokens": 5, "max_tokens": 50, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
        "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
        "seed": 7, "stop_token_ids": [5], "logit_bias": {"65": 2.5}, "ignore_eos": True, "min_tokens": 2,
        "user": "u1",
    }
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    prompt_ids, p, _ = engine.submitted[-1]
    assert engine.tokenizer.decode(prompt_ids) == (
        "<|system|>Be brief.\n<|user|>Hello\n<|assistant|>Yes?\n<|user|>Go\n<|assistant|>"
    )
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (5, 0.7, 0.9, 40, 0.05)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert (p.seed, tuple(p.stop_token_ids), p.logit_bias, p.ignore_eos, p.min_tokens) == (
        7, (5,), {65: 2.5}, True, 2)
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 5


def test_chat_stop_n_and_logprobs(client, engine: ScriptedEngine) -> None:
    req = {**CHAT, "stop": ["am"], "n": 2, "logprobs": True, "top_logprobs": 2}
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for c in choices:
        assert c["message"]["content"] == "Hello! I "
        assert c["finish_reason"] == "stop"
        content = c["logprobs"]["content"]
        assert [t["token"] for t in content[:3]] == ["H", "e", "l"]
        assert content[0]["logprob"] == -0.25 and content[0]["bytes"] == [72]
        assert [t["token"] for t in content[0]["top_logprobs"]] == ["H", "alt0"]


def test_chat_template_override() -> None:
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    engine = ScriptedEngine()
    with make_client(engine, chat_template=template) as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert engine.tokenizer.decode(engine.submitted[-1][0]) == "[user]Hi>"


def test_completion_single_prompt_echo(client, engine: ScriptedEngine) -> None:
    r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3, "echo": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "OnceHel"
    assert body["choices"][0]["finish_reason"] == "length"
    # A string prompt gets BOS, as the tokenizer adds it.
    assert engine.submitted[-1][0][0] == 1
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_completion_batch_of_prompts_and_token_ids(client, engine: ScriptedEngine) -> None:
    r = client.post("/v1/completions", json={"prompt": ["a", "bc"], "max_tokens": 2, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["He"] * 4
    assert body["usage"] == {"prompt_tokens": 2 + 3, "completion_tokens": 8, "total_tokens": 13}
    r = client.post("/v1/completions", json={"prompt": [[1, 70], [1, 71, 72]], "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert engine.submitted[-1][0] == [1, 71, 72]
    r = client.post("/v1/completions", json={"prompt": [1, 70, 71], "max_tokens": 1})
    assert r.status_code == 200 and engine.submitted[-1][0] == [1, 70, 71]


def test_completion_logprobs(client) -> None:
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 2})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["H", "e", "l"]
    assert lp["token_logprobs"] == [-0.25] * 3
    assert lp["text_offset"] == [0, 1, 2]
    assert lp["top_logprobs"][0] == {"H": -0.25, "alt0": -1.0}


def test_models(client) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == ["scripted-model"]
    assert data[0]["object"] == "model" and data[0]["max_model_len"] == 256


def test_served_model_names() -> None:
    with make_client(ScriptedEngine(), served_model_names=("smol", "alias")) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smol", "alias"]
        r = c.post("/v1/chat/completions", json={**CHAT, "model": "alias"})
        assert r.status_code == 200 and r.json()["model"] == "smol"
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 404


def test_tokenize_and_detokenize(client) -> None:
    r = client.post("/tokenize", json={"prompt": "ab"})
    assert r.json() == {"count": 3, "max_model_len": 256, "tokens": [1, 100, 101], "token_strs": ["<s>", "a", "b"]}
    r = client.post("/tokenize", json={"prompt": "ab", "add_special_tokens": False})
    assert r.json()["tokens"] == [100, 101]
    r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "a"}]})
    assert r.json()["count"] == len("<|user|>a\n<|assistant|>")
    r = client.post("/detokenize", json={"tokens": [100, 101]})
    assert r.status_code == 200 and r.json() == {"prompt": "ab"}


def test_health_version(client, engine: ScriptedEngine) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/version").json()["version"]
    engine.healthy = False
    r = client.get("/health")
    assert r.status_code == 503


def test_lifespan_shuts_engine_down(engine: ScriptedEngine) -> None:
    with make_client(engine) as c:
        assert c.get("/health").status_code == 200
    assert engine.shutdown_calls == 1


def test_openapi_schema_lists_every_route(client) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                 "/tokenize", "/detokenize", "/version"):
        assert path in schema["paths"], path
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert "429" in chat["responses"] and "400" in chat["responses"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
