#!/usr/bin/env bash
# Set everything up, then, with the bundled default model (SmolLM2-135M): build a small store
# from part of Tiny Shakespeare's training text, show the perplexity of Shakespeare's held-out
# test text with and without it, and generate a sample that cites its sources.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
DATA=${KNNSTORE_DATA:-../shared/data}
STORE=${1:-demo-store}
export PATH="$PWD/.venv/bin:$PATH"
rm -rf "$STORE" demo-data
mkdir -p demo-data
head -c 120000 "$DATA/tinyshakespeare/train.txt" > demo-data/shakespeare-train-part.txt
set -x
knnstore init "$STORE"
knnstore add-corpus "$STORE" shakespeare demo-data/shakespeare-train-part.txt
knnstore list "$STORE"
knnstore eval "$STORE" --text "$DATA/tinyshakespeare/test.txt" --max-tokens 4000
knnstore generate "$STORE" "ROMEO:" --max-new-tokens 24 --explain --sources 1
