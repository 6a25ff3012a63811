"""Bad input of every kind: the right status, an OpenAI error body, and the server still answers."""

from __future__ import annotations

import pytest
from scripted_engine import ScriptedEngine, make_client

GOOD = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def assert_error(r, status: int, *, param: str | None = "any", contains: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param != "any":
        assert err["param"] == param, err
    assert contains.lower() in err["message"].lower(), err["message"]
    return err


def assert_still_serves(client) -> None:
    r = client.post("/v1/chat/completions", json=GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hell"


@pytest.fixture()
def engine() -> ScriptedEngine:
    return ScriptedEngine(max_model_len=64)


@pytest.fixture()
def client(engine: ScriptedEngine):
    with make_client(engine, max_body_bytes=4096) as c:
        yield c


BAD_BODIES = [
    # (body, param, substring of the message)
    ({"max_tokens": 4}, "messages", "required"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": "hi"}, "messages", ""),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", ""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, None, ""),
    ({**GOOD, "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
    ({**GOOD, "max_tokens": 0}, "max_tokens", ""),
    ({**GOOD, "max_tokens": "ten"}, "max_tokens", "integer"),
    ({**GOOD, "max_tokens": 2.5}, "max_tokens", ""),
    ({**GOOD, "temperature": -0.1}, "temperature", ""),
    ({**GOOD, "temperature": 3}, "temperature", "less than or equal to 2"),
    ({**GOOD, "temperature": "hot"}, "temperature", ""),
    ({**GOOD, "top_p": 0}, "top_p", ""),
    ({**GOOD, "n": 0}, "n", ""),
    ({**GOOD, "n": True}, "n", ""),
    ({**GOOD, "stream": "yes"}, "stream", ""),
    ({**GOOD, "stop": 5}, None, ""),
    ({**GOOD, "top_logprobs": 21, "logprobs": True}, "top_logprobs", ""),
    ({**GOOD, "logit_bias": {"65": 1000}}, "logit_bias", "logit_bias"),
    ({**GOOD, "logit_bias": {"abc": 1}}, "logit_bias", "logit_bias"),
    ({**GOOD, "min_tokens": 9}, "min_tokens", "min_tokens"),
    ({**GOOD, "stop": [""]}, None, "stop"),
    ([1, 2, 3], None, ""),
]


@pytest.mark.parametrize("body,param,contains", BAD_BODIES)
def test_chat_schema_and_value_errors_are_400(client, body, param, contains) -> None:
    r = client.post("/v1/chat/completions", json=body)
    err = assert_error(r, 400, contains=contains)
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    assert err["type"] == "invalid_request_error"
    assert_still_serves(client)


def test_malformed_json_is_400(client) -> None:
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_error(r, 400, contains="not valid JSON")
    assert_still_serves(client)


def test_unknown_fields_are_ignored(client, caplog) -> None:
    with caplog.at_level("INFO"):
        r = client.post("/v1/chat/completions", json={**GOOD, "tools": [], "frobnicate": 1})
    assert r.status_code == 200
    assert "frobnicate" in caplog.text


def test_unknown_model_is_404(client) -> None:
    err = assert_error(client.post("/v1/chat/completions", json={**GOOD, "model": "gpt-9"}), 404, param="model")
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    assert_error(client.post("/v1/completions", json={"prompt": "x", "model": "nope"}), 404, param="model")
    assert_still_serves(client)


def test_unknown_route_and_method(client) -> None:
    assert_error(client.get("/v1/nothing-here"), 404, contains="not found")
    assert_error(client.get("/v1/chat/completions"), 405)
    assert_still_serves(client)


def test_oversized_body_is_413(client) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    err = assert_error(client.post("/v1/chat/completions", json=big), 413, contains="too large")
    assert err["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)
    assert_still_serves(client)


def test_context_overflow_says_by_how_much(client) -> None:
    long_prompt = {"messages": [{"role": "user", "content": "y" * 100}]}
    err = assert_error(client.post("/v1/chat/completions", json=long_prompt), 400, contains="too many")
    prompt_len = len("<|user|>" + "y" * 100 + "\n<|assistant|>")
    assert err["code"] == "context_length_exceeded"
    assert f"{prompt_len - 64 + 1} token(s) too many" in err["message"]
    # Prompt fits but prompt + max_tokens does not.
    req = {"messages": [{"role": "user", "content": "y" * 20}], "max_tokens": 40}
    err = assert_error(client.post("/v1/chat/completions", json=req), 400, param="max_tokens")
    over = len("<|user|>" + "y" * 20 + "\n<|assistant|>") + 40 - 64
    assert f"{over} token(s) too many" in err["message"]
    err = assert_error(client.post("/v1/completions", json={"prompt": "z" * 80}), 400, param="prompt")
    assert "81 tokens" in err["message"]
    assert_still_serves(client)


def test_completion_specific_errors(client) -> None:
    assert_error(client.post("/v1/completions", json={"prompt": []}), 400, param="prompt")
    assert_error(client.post("/v1/completions", json={"prompt": [[]]}), 400, param="prompt")
    assert_error(client.post("/v1/completions", json={"prompt": [10**9]}), 400, contains="vocabulary")
    assert_error(client.post("/v1/completions", json={}), 400, param="prompt")
    assert_error(client.post("/v1/completions", json={"prompt": "x", "echo": True, "logprobs": 21}), 400)
    assert_error(client.post("/detokenize", json={"tokens": [-1]}), 400, param="tokens")
    assert_error(client.post("/tokenize", json={}), 400)
    assert_still_serves(client)


def test_bad_api_key_is_401() -> None:
    engine = ScriptedEngine()
    with make_client(engine, api_key="sekret") as c:
        err = assert_error(c.post("/v1/chat/completions", json=GOOD), 401)
        assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
        assert_error(c.post("/v1/chat/completions", json=GOOD, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Basic sekret"}), 401)
        assert_error(c.post("/tokenize", json={"prompt": "x"}), 401)
        # Probes and scrapers need no key.
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
        ok = c.post("/v1/chat/completions", json=GOOD, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200


def test_queue_full_is_429_with_retry_after() -> None:
    engine = ScriptedEngine(max_running=0)
    with make_client(engine, retry_after_s=3) as c:
        r = c.post("/v1/chat/completions", json=GOOD)
        err = assert_error(r, 429)
        assert r.headers["retry-after"] == "3" and err["code"] == "queue_full"
        r = c.post("/v1/chat/completions", json={**GOOD, "stream": True})
        assert_error(r, 429)
        engine.max_running = None
        assert_still_serves(c)


def test_unhealthy_engine_is_503(client, engine: ScriptedEngine) -> None:
    engine.healthy = False
    for r in (client.post("/v1/chat/completions", json=GOOD), client.post("/v1/completions", json={"prompt": "x"}),
              client.get("/v1/models"), client.post("/tokenize", json={"prompt": "x"})):
        assert_error(r, 503)
    engine.healthy = True
    assert_still_serves(client)


def test_engine_value_error_is_400_and_bug_is_500(client, engine: ScriptedEngine, monkeypatch) -> None:
    async def broken(*args, **kwargs):
        raise ValueError("the engine refuses")
        yield  # pragma: no cover

    monkeypatch.setattr(engine, "generate", broken)
    assert_error(client.post("/v1/chat/completions", json=GOOD), 400, contains="the engine refuses")

    async def buggy(*args, **kwargs):
        raise KeyError("oops")
        yield  # pragma: no cover

    monkeypatch.setattr(engine, "generate", buggy)
    err = assert_error(client.post("/v1/chat/completions", json=GOOD), 500)
    assert err["type"] == "server_error"
    monkeypatch.undo()
    assert_still_serves(client)
