#!/usr/bin/env bash
# Fuzz the HTTP API with schemathesis against the server's own OpenAPI schema; fail on any 5xx.
#
#   scripts/fuzz_api.sh                 # start `qalora serve` (default model, tiny context), fuzz, stop it
#   scripts/fuzz_api.sh http://HOST:PORT   # fuzz a server that is already running
#
# Environment: MAX_EXAMPLES (default 200 per operation), MAX_TIME (seconds, default 900),
# WORKERS (default 2), MODEL (model for the started server), PYTHON (default .venv/bin/python).
# A short run of the same check is in the test suite (tests/e2e/test_e2e_fuzz.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ST=${ST:-$(dirname "$PYTHON")/st}
MAX_EXAMPLES=${MAX_EXAMPLES:-200}
MAX_TIME=${MAX_TIME:-900}
WORKERS=${WORKERS:-2}
[ -x "$ST" ] || { echo "schemathesis not found at $ST: $PYTHON -m pip install schemathesis" >&2; exit 2; }

SERVER_PID=""
cleanup() { [ -n "$SERVER_PID" ] && kill -TERM "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" || true; }
trap cleanup EXIT

if [ $# -ge 1 ]; then
  BASE=${1%/}
else
  PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  BASE="http://127.0.0.1:$PORT"
  # A tiny context keeps every fuzzed request short: omitting max_tokens means "to the end of the context".
  "$PYTHON" -m qalora_runtime serve ${MODEL:+"$MODEL"} --port "$PORT" --max-model-len 64 \
      --kv-cache-memory 128MiB --max-num-seqs 32 --log-level WARNING &
  SERVER_PID=$!
  for _ in $(seq 1 1200); do
    curl -fs "$BASE/health" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited" >&2; exit 1; }
    sleep 0.5
  done
  curl -fs "$BASE/health" >/dev/null || { echo "server not healthy" >&2; exit 1; }
fi

ST=$(cd "$(dirname "$ST")" && pwd)/$(basename "$ST")
WORK=$(mktemp -d)  # schemathesis keeps its cache in the working directory
cd "$WORK"
echo "fuzzing $BASE (max $MAX_EXAMPLES examples per operation, max ${MAX_TIME}s)"
"$ST" run "$BASE/openapi.json" --checks not_a_server_error --max-examples "$MAX_EXAMPLES" \
    --max-time "$MAX_TIME" --workers "$WORKERS" --request-timeout 300 --no-color
