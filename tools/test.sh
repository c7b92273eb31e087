#!/usr/bin/env bash
# Set everything up, then run the whole test suite (the real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
