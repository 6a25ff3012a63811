"""`qalora serve [MODEL]`: the OpenAI-compatible HTTP server (uvicorn) around an AsyncEngine.

The server starts listening at once and loads the model on a background
thread; /health answers 503 until it is ready. SIGTERM (or Ctrl-C) stops
accepting connections, lets in-flight requests finish for up to
--drain-timeout seconds, aborts the rest, and exits 0.

Binds 127.0.0.1 by default, so a server started for local use is not exposed
on the network by accident; pass --host 0.0.0.0 to serve other machines (and
set --api-key when you do).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
from pathlib import Path
from types import FrameType

logger = logging.getLogger(__name__)

API_KEY_ENV = "QALORA_API_KEY"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes (binary units are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GiB, 512MiB, 1000000)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `serve` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="serve a model with an OpenAI-compatible HTTP API",
        description="Serve MODEL (a merged QA-LoRA checkpoint directory or a .gguf file; default: "
        "SmolLM2-135M-Instruct) over an OpenAI-compatible HTTP API with SSE streaming and /metrics.",
    )
    p.add_argument("model", nargs="?", default=None, help="model directory or .gguf file (default: the default model)")
    net = p.add_argument_group("HTTP")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    net.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                     help="name clients use in 'model' (repeatable; default: the MODEL argument or the default model's name)")
    net.add_argument("--api-key", default=None,
                     help=f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV} if set)")
    net.add_argument("--chat-template", default=None, help="Jinja chat template: a file path or the template text")
    net.add_argument("--max-body-size", type=parse_bytes, default="4MiB", help="largest request body (default 4MiB)")
    net.add_argument("--drain-timeout", type=float, default=30.0,
                     help="seconds in-flight requests may run on after SIGTERM (default 30)")
    eng = p.add_argument_group("engine")
    eng.add_argument("--dtype", default=None, help="compute dtype (bfloat16, float32...; default: the model's choice)")
    eng.add_argument("--fp32-matmul-precision", choices=("highest", "high", "medium"), default=None,
                     help="torch.set_float32_matmul_precision: 'medium' lets a float32 model prefill with "
                          "bf16 products on AVX512-BF16/AMX CPUs (default: torch's, 'highest': exact)")
    eng.add_argument("--max-model-len", type=_positive_int, default=None, help="context length (default: the model's)")
    eng.add_argument("--max-num-seqs", type=_positive_int, default=64, help="largest running batch (default 64)")
    eng.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048,
                     help="token budget per engine step (default 2048)")
    eng.add_argument("--block-size", type=_positive_int, default=16, help="KV-cache block size in tokens (default 16)")
    eng.add_argument("--kv-cache-memory", type=parse_bytes, default=None, help="KV-cache size, e.g. 2GiB (default 1GiB)")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                     help="reuse KV blocks of shared prompt prefixes (default on)")
    eng.add_argument("--max-queued-requests", type=_positive_int, default=256,
                     help="waiting requests beyond which new ones get 429 (default 256)")
    # Also accepted after the subcommand; SUPPRESS keeps `qalora --log-level X serve` working.
    p.add_argument("--log-level", default=argparse.SUPPRESS, help="logging level (DEBUG, INFO, WARNING)")
    p.set_defaults(func=run)
    return p


def _chat_template_text(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        return path.read_text()
    if "{" not in value:  # neither an existing file nor a template: most likely a typo'd path
        raise FileNotFoundError(f"--chat-template: no such file: {value}")
    return value


def _served_names(args: argparse.Namespace) -> tuple[str, ...]:
    if args.served_model_name:
        return tuple(args.served_model_name)
    if args.model is None:
        from ..formats.default_model import DEFAULT_MODEL_NAME

        return (DEFAULT_MODEL_NAME,)
    return (Path(args.model.rstrip("/")).name if os.path.exists(args.model) else args.model,)


def run(args: argparse.Namespace) -> int:
    """Start the server; returns when it is stopped (0) or the model fails to load (error)."""
    import uvicorn

    from server.app import build_app
    from server.loading import LoadingEngine
    from server.settings import ServerSettings

    from ..engine.async_engine import AsyncEngine

    chat_template = _chat_template_text(args.chat_template)
    if args.fp32_matmul_precision:
        import torch

        torch.set_float32_matmul_precision(args.fp32_matmul_precision)  # process-wide, read per kernel call
    settings = ServerSettings(
        served_model_names=_served_names(args),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        chat_template=chat_template,
        max_body_bytes=args.max_body_size,
        drain_timeout_s=args.drain_timeout,
    )

    def factory() -> AsyncEngine:
        return AsyncEngine.create(
            args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory,
            enable_prefix_caching=args.enable_prefix_caching,
            max_queued_requests=args.max_queued_requests,
            chat_template=chat_template,
        )

    server: uvicorn.Server | None = None

    def on_load_failure(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    engine = LoadingEngine(factory, on_failure=on_load_failure)
    app = build_app(engine, settings)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_config=None, log_level=level,
        timeout_graceful_shutdown=max(1, int(args.drain_timeout)), lifespan="on",
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; with the
    # default SIGTERM action that would kill the process (status 143) after a clean drain.
    signal.signal(signal.SIGTERM, _log_signal)
    engine.start()
    logger.info("loading %s in the background; /health answers 503 until it is ready",
                args.model or "the default model")
    server.run()
    if engine.load_error is not None:
        raise ValueError(f"could not load the model: {engine.load_error}") from engine.load_error
    if not server.started:
        raise ValueError(f"the server could not start on {args.host}:{args.port} (see the log above)")
    logger.info("server stopped")
    return 0


def _log_signal(signum: int, frame: FrameType | None) -> None:
    logger.info("received %s after shutdown", signal.Signals(signum).name)
