#!/usr/bin/env bash
# The GPU checks for issue 3, as one script for a GPU lease (15 minutes of device time).
#
# Before the lease, on the CPU machine (needs ../shared/data and the embedded student):
#   .venv/bin/python -m lalp_resources.benchmark --prompts 24 --write-bundle .devbundle
# The lease carries .devbundle (3.6 MiB: ZeroEval rows + the student's config and tokenizer).
# Its image has torch and transformers; nothing else of ours is needed. The student's weights
# (98 MB) cannot travel, so the GPU runs use its architecture with seeded random weights: speed,
# MFU and engine == reference do not depend on the weight values.
#
# Writes everything under $OUT (default /tmp/gpu_check); the bf16 run's last line is
# `speedup=... max_abs_diff=...` and the report above it has the MFU line.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ ! -f .devbundle/rows.jsonl ]; then
  echo "no .devbundle here: write it first (see the top of $0)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
status=0
# 1. exactness on the GPU: the engine equals the reference in float32 (tests + the benchmark's diff)
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt" || status=1
timeout 240 $PY -m lalp_resources.benchmark --bundle .devbundle --random-weights --device cuda --dtype float32 \
  --prompts 8 2>&1 | grep -v "Loading weights" | tee "$OUT/bench_fp32.txt" || status=1
# 2. speed and utilisation in bf16 (the default on CUDA), then peak memory for 1k, 8k and 32k tokens
timeout 300 $PY -m lalp_resources.benchmark --bundle .devbundle --random-weights --device cuda --dtype bfloat16 \
  --prompts 24 --memory 2>&1 | grep -v "Loading weights" | tee "$OUT/bench_bf16.txt" || status=1
exit $status
