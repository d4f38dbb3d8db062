#!/usr/bin/env bash
# The GPU figures in one run, on a machine with CUDA (issue 19, part 6): the collaborative
# optimizer's peak CUDA memory and step time against a plain torch loop on a ~1 B-parameter
# model (benchmarks/memory.py), and a remote expert on the GPU against the same expert computed
# locally on it, in float32 and in bfloat16 (benchmarks/moe.py). Results land in
# benchmarks/results/ (memory-cuda.json, moe-cuda-*.json), and in $OUT when set; then
# `benchmarks/report.py` regenerates docs/benchmarks.md's tables.
#
# Usage, from the repository root: bash benchmarks/gpu.sh
# Where apiary's dependencies are not installed (a bare CUDA image with torch), wheels for
# Python 3.12 placed in .whl/ are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0), torch.__version__)'
failed=0  # each benchmark runs even if one before it failed
"$PY" benchmarks/memory.py --device cuda --params "${GPU_PARAMS:-1000000000}" --width 8192 --batch 32 --steps 5 || failed=1
"$PY" benchmarks/moe.py --device cuda --dtype float32 --presets large,xl --steps 30 --threads 4 || failed=1
"$PY" benchmarks/moe.py --device cuda --dtype bfloat16 --presets large,xl --steps 30 --threads 4 || failed=1
if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/memory-cuda.json benchmarks/results/moe-cuda-*.json "$OUT"/ 2>/dev/null || true
fi
exit "$failed"
