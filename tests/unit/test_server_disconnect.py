"""A client that hangs up aborts its engine request at once: streamed, non-streamed, or still queued.

Driven at the ASGI level, so the disconnect arrives exactly when the test says.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from scripted_engine import ScriptedEngine

from server.app import build_app
from server.settings import ServerSettings


class ASGIClient:
    """Sends one JSON POST to an ASGI app; disconnects when ``hang_up`` is set."""

    def __init__(self, app, path: str, body: dict) -> None:
        self.app = app
        self.path = path
        self.body = json.dumps(body).encode()
        self.hang_up = asyncio.Event()
        self.messages: list[dict] = []
        self.data_frames = 0
        self._body_sent = False

    async def _receive(self) -> dict:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body":
            self.data_frames += message.get("body", b"").count(b"data: ")

    async def run(self) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())],
        }
        await self.app(scope, self._receive, self._send)


async def wait_until(predicate, timeout: float = 1.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


@pytest.fixture()
def engine() -> ScriptedEngine:
    return ScriptedEngine(reply="z" * 10_000, token_delay=0.005, max_model_len=100_000)


CHAT = {"messages": [{"role": "user", "content": "talk forever"}]}


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {**CHAT, "stream": True}),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}),
])
def test_stream_disconnect_aborts_at_once(engine: ScriptedEngine, path: str, body: dict) -> None:
    async def scenario() -> None:
        client = ASGIClient(build_app(engine, ServerSettings()), path, body)
        task = asyncio.create_task(client.run())
        await wait_until(lambda: client.data_frames >= 5)
        assert engine.running
        client.hang_up.set()
        await wait_until(lambda: not engine.running)
        await asyncio.wait_for(task, 1.0)
        assert engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0
        assert len(engine.aborted) == len(engine.submitted)

    asyncio.run(scenario())


def test_non_streamed_disconnect_aborts(engine: ScriptedEngine) -> None:
    async def scenario() -> None:
        client = ASGIClient(build_app(engine, ServerSettings()), "/v1/chat/completions", CHAT)
        task = asyncio.create_task(client.run())
        await wait_until(lambda: len(engine.submitted) == 1 and engine.running)
        await asyncio.sleep(0.05)
        client.hang_up.set()
        await wait_until(lambda: not engine.running)
        await asyncio.wait_for(task, 1.0)
        assert engine.aborted == [engine.submitted[0][2]]
        assert client.messages[0]["status"] == 499

    asyncio.run(scenario())


def test_disconnect_while_waiting_for_the_first_token() -> None:
    slow = ScriptedEngine(token_delay=30.0)  # the first output never comes in time

    async def scenario() -> None:
        client = ASGIClient(build_app(slow, ServerSettings()), "/v1/chat/completions", {**CHAT, "stream": True})
        task = asyncio.create_task(client.run())
        await wait_until(lambda: slow.running)
        client.hang_up.set()
        await wait_until(lambda: not slow.running)
        await asyncio.wait_for(task, 1.0)
        assert len(slow.aborted) == 1

    asyncio.run(scenario())
