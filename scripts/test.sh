#!/usr/bin/env bash
# Set up the virtualenv and run the test suite (the README's test command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Optional system tools some tests use (promtool and a real Prometheus server for the
# metrics tests). Best effort: where they cannot be installed those tests skip and say so.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
    || echo "test.sh: could not install prometheus; its tests will skip" >&2
fi
exec "${QALORA_VENV:-.venv}/bin/python" -m pytest -q "$@"
