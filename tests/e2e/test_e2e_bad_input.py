"""Bad input against the real server: OpenAI error bodies, and the next good request still answered."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import MODEL_NAME

GOOD = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def check(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("content,status", [
    (b'{"messages": [', 400),  # malformed JSON
    (b'{"messages": "hi"}', 400),  # wrong type
    (b'{"max_tokens": 4}', 400),  # missing messages
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}', 400),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', 400),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}', 404),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * (5 << 20) + b'"}]}', 413),
])
def test_bad_request_then_good_one(http: httpx.Client, content: bytes, status: int) -> None:
    r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    check(r, status)
    assert http.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_context_overflow_says_by_how_much(http: httpx.Client) -> None:
    prompt = "hello " * 600
    n = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    err = check(http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt}), 400)
    assert f"{n - 512 + 1} token(s) too many" in err["message"]
    assert http.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=GOOD["messages"])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
