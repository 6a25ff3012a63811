"""Start, probe and stop a real `qalora serve` process on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
#: Set to 1 to run the e2e suite against the scripted engine (tests/e2e/fake_server.py)
#: instead of a real model: for developing these tests without a model.
FAKE_ENV = "QALORA_E2E_FAKE"


def fake_mode() -> bool:
    """True when the suite runs against the scripted engine."""
    return os.environ.get(FAKE_ENV) == "1"


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess; its combined output goes to a temp file, shown when something fails."""

    def __init__(self, model: str | None, extra_args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        if fake_mode():
            cmd = [sys.executable, str(REPO / "tests" / "e2e" / "fake_server.py")]
        else:
            cmd = [sys.executable, "-m", "qalora_runtime", "serve"] + ([model] if model else [])
        self.cmd = cmd + ["--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        self._log = tempfile.NamedTemporaryFile("w+", prefix="qalora-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's output."""
        return Path(self._log.name).read_text(errors="replace")[-chars:]

    def wait_healthy(self, timeout: float) -> None:
        """Poll /health until 200; fail early if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
