#!/usr/bin/env bash
# Set everything up, then, with the bundled default model (SmolLM2-135M): build a small store
# from the last chapters of the training part of two Jane Austen novels (Project Gutenberg,
# one corpus each), look inside it with SQL, show the perplexity of the held-out end of "Emma" with and without the store, and generate
# a sample without the store (--lambda 0) and with it, citing the stored text behind each token.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
DATA=${KNNSTORE_DATA:-../shared/data}
STORE=${1:-demo-store}
export PATH="$PWD/.venv/bin:$PATH"
rm -rf "$STORE" demo-data
mkdir -p demo-data
tail -c 100000 "$DATA/gutenberg/docs/austen-emma.txt" > demo-data/emma.txt
tail -c 60000 "$DATA/gutenberg/docs/austen-persuasion.txt" > demo-data/persuasion.txt
set -x
knnstore init "$STORE"
knnstore add-corpus "$STORE" emma demo-data/emma.txt
knnstore add-corpus "$STORE" persuasion demo-data/persuasion.txt
knnstore list "$STORE"
knnstore sql "$STORE" "SELECT corpus, count(*) AS pairs, round(100.0 * count(*) / (SELECT count(*) FROM pairs), 1) AS pct FROM pairs GROUP BY 1 ORDER BY 2 DESC"
knnstore eval "$STORE" --text "$DATA/gutenberg/test.txt" --max-tokens 4000
knnstore generate "$STORE" "Emma could not forgive Mr." --max-new-tokens 8 --lambda 0
knnstore generate "$STORE" "Emma could not forgive Mr." --max-new-tokens 8 --explain --sources 1
