"""Fixtures of the end-to-end suite: a real `qalora serve` process and OpenAI clients pointed at it.

Skipped (reason "AsyncEngine not available") only when the engine cannot be
imported. The model is the default one (SmolLM2-135M-Instruct), taken from the
``smollm2_dir`` fixture when the suite defines it.
"""

from __future__ import annotations

from typing import Iterator

import httpx
import openai
import pytest
from server_process import ServerProcess, fake_mode

MODEL_NAME = "smollm2"
STARTUP_TIMEOUT_S = 600.0  # the first use converts the GGUF; later starts take seconds

try:
    from qalora_runtime.engine.async_engine import AsyncEngine  # noqa: F401

    _ENGINE_IMPORT_ERROR: str | None = None
except ImportError as exc:
    _ENGINE_IMPORT_ERROR = str(exc)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=f"AsyncEngine not available ({_ENGINE_IMPORT_ERROR})")
    for item in items:
        if "tests/e2e/" not in str(item.fspath).replace("\\", "/"):
            continue
        item.add_marker(pytest.mark.slow)  # each server start loads the real model
        if _ENGINE_IMPORT_ERROR is not None and not fake_mode():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_path(request: pytest.FixtureRequest) -> str | None:
    """The real model's directory, or None to let the server pick the default model."""
    if fake_mode():
        return None
    try:
        return str(request.getfixturevalue("smollm2_dir"))
    except pytest.FixtureLookupError:
        return None


def start_server(model: str | None, *args: str) -> ServerProcess:
    """A healthy server (the test fails with the server log if it does not come up)."""
    server = ServerProcess(model, ["--served-model-name", MODEL_NAME, *args])
    try:
        server.wait_healthy(STARTUP_TIMEOUT_S)
    except BaseException:
        server.stop(10)
        raise
    return server


@pytest.fixture(scope="session")
def server(model_path: str | None) -> Iterator[ServerProcess]:
    """The shared server: short context so every request ends quickly on a CPU."""
    proc = start_server(
        model_path, "--max-model-len", "512", "--kv-cache-memory", "128MiB", "--max-num-seqs", "32",
        "--max-queued-requests", "256",
    )
    yield proc
    code = proc.stop()
    assert code == 0, f"server exit status {code}:\n{proc.log_tail()}"


@pytest.fixture()
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def async_client(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c
