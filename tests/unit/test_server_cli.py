"""`qalora serve` argument parsing and the LoadingEngine that lets /health say "loading"."""

from __future__ import annotations

import argparse
import threading

import pytest
from scripted_engine import ScriptedEngine, make_client

from qalora_runtime.cli import build_parser
from qalora_runtime.cli.serve import parse_bytes
from server.loading import EngineNotReady, LoadingEngine


@pytest.mark.parametrize("text,value", [
    ("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5G", 1_500_000_000), ("1000", 1000), ("64 kib", 65536),
])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "2XB", "-1GiB", "0"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_serve_flags() -> None:
    args = build_parser().parse_args([
        "serve", "model_dir", "--port", "9000", "--served-model-name", "a", "--served-model-name", "b",
        "--kv-cache-memory", "1GiB", "--no-enable-prefix-caching", "--max-queued-requests", "5",
        "--log-level", "DEBUG", "--max-model-len", "1024", "--fp32-matmul-precision", "medium",
    ])
    assert (args.model, args.port, args.host) == ("model_dir", 9000, "127.0.0.1")
    assert args.served_model_name == ["a", "b"] and args.kv_cache_memory == 1 << 30
    assert args.enable_prefix_caching is False and args.max_queued_requests == 5
    assert args.log_level == "DEBUG" and args.max_model_len == 1024 and args.fp32_matmul_precision == "medium"
    defaults = build_parser().parse_args(["--log-level", "WARNING", "serve"])
    assert defaults.model is None and defaults.enable_prefix_caching is True and defaults.log_level == "WARNING"
    assert defaults.fp32_matmul_precision is None  # torch's own setting stays


def test_serve_rejects_bad_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-num-seqs", "0"])
    assert "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--fp32-matmul-precision", "low"])
    assert "invalid choice" in capsys.readouterr().err


def test_loading_engine_is_503_until_loaded() -> None:
    gate = threading.Event()
    real = ScriptedEngine()

    def factory() -> ScriptedEngine:
        gate.wait(10)
        return real

    engine = LoadingEngine(factory)
    engine.start()
    with make_client(engine, served_model_names=("m",)) as c:
        assert c.get("/health").status_code == 503
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert c.get("/metrics").status_code == 200  # scrapers keep working while loading
        with pytest.raises(EngineNotReady):
            engine.model_info
        gate.set()
        assert engine.wait(5)
        assert c.get("/health").status_code == 200
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "m"
        assert "qalora_iteration_tokens_count" in c.get("/metrics").text  # listener attached after load


def test_loading_failure_is_reported() -> None:
    failures: list[BaseException] = []

    def factory() -> ScriptedEngine:
        raise ValueError("no such model")

    engine = LoadingEngine(factory, on_failure=failures.append)
    engine.start()
    assert engine.wait(5)
    assert isinstance(engine.load_error, ValueError) and failures == [engine.load_error]
    assert not engine.is_healthy
