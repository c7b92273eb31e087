#!/usr/bin/env bash
# The GPU checks of docs/scale-out.md, as one script for a machine with a CUDA GPU.
#
#   bash tools/gpu_check.sh [OUT_DIR]
#
# Needs knnstore's dependencies importable (pip install -e ".[dev]" with a CUDA torch) and
# ../shared/data beside the checkout. Runs: the CUDA tests (tests/test_devices.py, which skip
# without a GPU elsewhere); ingest tokens/s on the GPU vs the CPU (tools/bench_ingest.py
# --device); k-means and the IVF-RQ build on the GPU vs the CPU (tools/bench_index.py
# --device), on a store it builds from WikiText-2 valid. Writes each step's output to
# OUT_DIR (default ./gpu-check) and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))" | tee "$out/gpu.txt"
python3 -m pytest -q tests/test_devices.py tests/test_kmeans.py 2>&1 | tee "$out/tests.txt"
for device in cuda cpu; do
  python3 tools/bench_ingest.py --repeats 2 --device "$device" 2>&1 | tee "$out/ingest-$device.txt"
done
store="$out/wiki-valid"
rm -rf "$store"
python3 -m knnstore init "$store" --device cuda
python3 -m knnstore add-corpus "$store" wiki ../shared/data/wikitext-2/valid.txt --split-on-heading \
  --device cuda --batch-size 64 --no-index 2>&1 | tee "$out/add-corpus.txt"
for device in cuda cpu; do
  python3 tools/bench_index.py "$store" --device "$device" 2>&1 | tee "$out/index-$device.txt"
done
