#!/usr/bin/env bash
# One command for a machine with one CUDA GPU: the GPU-marked tests, then the inference and training benches
# at GPU sizes, then one table. Budget: at most 8 minutes (each step has its own timeout; a step that fails or
# times out is reported as such and the rest still run).
#
#   bench/gpu_check.sh            (from the repo root, after scripts/setup; no Postgres or Redis needed)
#
# Not run yet: no accelerator has been lent to this project's sessions so far.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
OUT=${OUT:-$(mktemp -d /tmp/llmq-gpu-check-XXXXXX)}
mkdir -p "$OUT"
declare -a ROWS=()

step() {  # step NAME TIMEOUT_S COMMAND...: runs it, keeps its output, adds a row: name, status, seconds
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  echo "== $name (at most ${limit}s)" >&2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? status=ok
  [ $rc -eq 124 ] && status="timed out" || { [ $rc -ne 0 ] && status="failed (rc $rc)"; }
  ROWS+=("| $name | $status | $((SECONDS - started)) s | $OUT/$name.log |")
}

$PY - >"$OUT/device.txt" 2>&1 <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
[ $? -eq 0 ] || { cat "$OUT/device.txt"; exit 1; }

# 1. CUDA tests: 4-bit load, static/continuous/mixed-adapter generation, a few QLoRA steps (tiny model).
step gpu-tests 150 $PY -m pytest tests/test_gpu.py -q -p no:cacheprovider -m gpu
# 2. Continuous vs static batching and grouped LoRA, full-size GPT-2 (random weights), nf4, batch 64.
step inference 200 $PY bench/continuous_batching.py --device cuda --quantization nf4 --batch 64 --requests 128 \
  --adapter-rounds 2
# 3. Training throughput: llmq's path against the TRL baselines, same data, nf4 base, batch 16 x 512.
step training 150 $PY bench/train.py --device cuda --steps 5 --warmup 2 --batch-size 16 --max-seq-len 512

{
  echo "## GPU check: $(cat "$OUT/device.txt")"
  echo
  echo "| step | status | wall | log |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  grep -E "passed|failed|skipped" "$OUT/gpu-tests.log" | tail -1
  echo
  sed -n '/^## Continuous/,$p' "$OUT/inference.log"
  echo
  grep -E "^\|" "$OUT/training.log"
} | tee "$OUT/table.md"
