"""API key on a real server, and SIGTERM: in-flight streams finish, new connections are refused, exit 0."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from conftest import MODEL_NAME, start_server

KEY = "e2e-secret"


@pytest.fixture(scope="module")
def keyed_server(model_path):
    proc = start_server(model_path, "--max-model-len", "256", "--kv-cache-memory", "64MiB",
                        "--api-key", KEY, "--drain-timeout", "60")
    yield proc
    proc.stop()


def test_api_key(keyed_server) -> None:
    bad = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key=KEY, max_retries=0)
    assert good.models.list().data[0].id == MODEL_NAME
    assert httpx.get(keyed_server.base_url + "/health").status_code == 200
    assert httpx.get(keyed_server.base_url + "/metrics").status_code == 200


def test_sigterm_drains_in_flight_streams_and_exits_0(keyed_server) -> None:
    client = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    stream = client.completions.create(model=MODEL_NAME, prompt="Tell me a story.", max_tokens=40, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    result: dict = {}

    def read_rest() -> None:
        chunks = [first, *stream]
        result["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    reader = threading.Thread(target=read_rest)
    reader.start()
    keyed_server.proc.send_signal(15)
    time.sleep(0.5)
    with pytest.raises(httpx.HTTPError):  # no new connections while draining
        httpx.get(keyed_server.base_url + "/health", timeout=2)
    reader.join(120)
    assert result.get("finish") == "length"  # the in-flight stream ran to its end
    assert keyed_server.proc.wait(60) == 0, keyed_server.log_tail()
