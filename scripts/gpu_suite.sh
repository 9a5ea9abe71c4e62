#!/usr/bin/env bash
# `refface bench --suite gpu` on a CUDA machine that has torch, transformers, accelerate and safetensors but neither
# diffusers nor a network (the project's H100/H200 device machines). The diffusers wheel travels in WHEELS (default
# wheels/, ignored by git); every wheel there is installed without dependencies and without an index. The bench path
# also needs numpy and Pillow (diffusers imports both); put their wheels in WHEELS too if the import check fails.
# The table goes to stdout and $OUT/gpu_suite.txt, the JSON to $OUT/gpu_suite.json, rewritten after every cell, so
# the figures measured so far survive the time limit (SECONDS_LIMIT, default 480).
#
#   mkdir -p wheels && cp /work/wheels/diffusers-0.42.1-py3-none-any.whl wheels/
#   bash scripts/gpu_suite.sh wheels        # on the device: carry ["wheels"], timeout_s 540
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-wheels}
out=${OUT:-.}
python -m pip install --quiet --no-deps --no-index "$wheels"/*.whl
python -c "import refface_core.bench_suite" # names the module that is missing, if one is
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
PYTHONPATH=$PWD timeout "${SECONDS_LIMIT:-480}" python -m refface_core bench --suite gpu --json "$out/gpu_suite.json" \
    | tee "$out/gpu_suite.txt"
