#!/usr/bin/env bash
# Set up the virtualenv and run the test suite (the README's test command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${QALORA_VENV:-.venv}/bin/python" -m pytest -q "$@"
