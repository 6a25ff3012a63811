"""A short schemathesis run against the real server's own OpenAPI schema: no 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_server


@pytest.fixture(scope="module")
def small_server(model_path):
    # A tiny context: fuzzed requests may omit max_tokens, which means "to the end of the context".
    proc = start_server(model_path, "--max-model-len", "48", "--kv-cache-memory", "64MiB", "--max-num-seqs", "16")
    yield proc
    assert proc.stop() == 0, proc.log_tail()


# A short run for the suite (the coverage phase alone takes minutes against a real model);
# scripts/fuzz_api.sh runs every phase with more examples.
def test_schemathesis_no_server_errors(small_server, tmp_path: Path) -> None:
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    if not Path(st).exists():
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    proc = subprocess.run(
        [st, "run", small_server.base_url + "/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "6", "--workers", "2", "--request-timeout", "120", "--phases", "examples,fuzzing",
         "--generation-deterministic", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,  # st writes its cache to the cwd
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:] + small_server.log_tail(3000)
