#!/usr/bin/env bash
# Set up the virtualenv and start the server on the default model
# (SmolLM2-135M-Instruct, converted from its GGUF on first run and cached).
# Extra arguments go to `qalora serve`, e.g. scripts/serve.sh --port 8080.
set -euo pipefail
cd "$(dirname "$0")/.."
QALORA_EXTRAS= bash scripts/setup.sh
exec "${QALORA_VENV:-.venv}/bin/qalora" serve "$@"
