"""Serve the scripted test engine over real HTTP (uvicorn), for developing the e2e tests without a model.

Used only when QALORA_E2E_FAKE=1; accepts (and mostly ignores) `qalora serve` flags.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripted_engine import ScriptedEngine  # noqa: E402

from server.app import build_app  # noqa: E402
from server.settings import ServerSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--served-model-name", default="scripted-model")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    args, _ = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO)
    engine = ScriptedEngine(reply="The capital of France is Paris. " * 4, max_model_len=args.max_model_len,
                            token_delay=0.01)
    settings = ServerSettings(served_model_names=(args.served_model_name,), api_key=args.api_key,
                              drain_timeout_s=args.drain_timeout)
    signal.signal(signal.SIGTERM, lambda *a: None)  # see qalora_runtime/cli/serve.py
    uvicorn.run(build_app(engine, settings), host=args.host, port=args.port, log_config=None,
                timeout_graceful_shutdown=int(args.drain_timeout))


if __name__ == "__main__":
    main()
