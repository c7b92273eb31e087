#!/usr/bin/env bash
# Set everything up, then build a small store from three WikiText-2 articles with the
# bundled default model (SmolLM2-135M) and show what is in it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
DATA=${KNNSTORE_DATA:-../shared/data}
STORE=${1:-demo-store}
export PATH="$PWD/.venv/bin:$PATH"
rm -rf "$STORE"
set -x
knnstore init "$STORE"
knnstore add-corpus "$STORE" wiki "$DATA/wikitext-2/valid.txt" --split-on-heading --max-documents 3
knnstore list "$STORE"
knnstore stats "$STORE"
python tools/neighbours.py "$STORE" "The European lobster is a species of clawed"
