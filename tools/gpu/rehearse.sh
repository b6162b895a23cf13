#!/usr/bin/env bash
# The real run rehearsed on one GPU, in one call that fits a short lease (BUDGET_S, default 540 s, in all):
#
#   1. the trainer itself on CUDA (`tiny`: bf16 autocast, fused AdamW, SDPA, eval with generation), 20 steps eager;
#   2. `tools.bench.step` at the real sizes (GLM-ASR-Nano's tower, Qwen3-0.6B with all its layers and vocabulary,
#      random weights built on the GPU, nothing downloaded), batch 16: the trainer's step against the naive one,
#      samples/s and peak memory, the projectors alone at their real widths, mlp eager against torch.compile;
#   3. the trainer compiled: 10 steps and a save, then a second process resumes to 20 (kernels from the cache);
#   4. the same benchmark on Qwen3-1.7B: mosa's step, then mosa and moe eager against torch.compile.
#
# The parts run in that order (most wanted first), each under its own time limit and what is left of the budget,
# and write their logs and JSON under $OUT as they go (7 files), so a part that runs long costs only itself. On a machine without network, carry the wheels tools/gpu/wheels.sh fetched (.whl): they are
# installed into /tmp/site first. QUICK=1 runs the same on the benchmark's small sizes (a CPU check of the script).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-outputs/gpu-rehearsal}"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/rehearsal-cache/inductor}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/rehearsal-cache/triton}"
part() { echo "=== $* ($(date -u +%H:%M:%S))"; }
status=0
deadline=$((SECONDS + ${BUDGET_S:-540}))
run() {  # run LIMIT_S NAME COMMAND...: output to the console and $OUT/NAME.log (appended); a failure is noted
  local limit="$1" name="$2"
  shift 2
  local left=$((deadline - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    echo "rehearsal: $name skipped, the budget is spent" | tee -a "$OUT/summary.txt"
    status=1
    return 0
  fi
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  if ((rc != 0)); then
    echo "rehearsal: $name ended with exit $rc$( ((rc == 124)) && echo " (its ${limit}s limit)")" | tee -a "$OUT/summary.txt"
    status=1
  fi
  return 0
}

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  part "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

part "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null || echo "no nvidia-smi"
  "$PYTHON" -c "import torch, transformers, accelerate, peft
cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if cuda else 'no GPU')
print('transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

if [[ "${QUICK:-0}" == 1 ]]; then
  BENCH06=(--steps 1 --projector-steps 1 --projector-widths bench)
  BENCH17=(--steps 1 --projector-steps 1 --projector-widths none)
else
  BENCH06=(--real 0.6b --batch-size 16 --steps 4)
  BENCH17=(--real 1.7b --batch-size 16 --steps 4 --projector-widths none)
fi
TRAIN=("$PYTHON" entrypoint.py train tracking.mode=disabled training.logging_steps=5 training.eval_steps=10)
rm -rf /tmp/rehearsal-runs

part "1. the trainer on this device: tiny, eager, 20 steps"
EXP=tiny OUTPUT_DIR=/tmp/rehearsal-runs/eager run 120 train \
  "${TRAIN[@]}" training.compile=false training.max_steps=20 training.save_steps=20

part "2. the step at the real sizes, Qwen3-0.6B: trainer vs naive, the projectors alone, mlp eager vs compiled"
run 200 bench-0.6b "$PYTHON" -m tools.bench.step "${BENCH06[@]}" --projector mlp --compile-projectors mlp \
  --json-out "$OUT/bench-0.6b.json"

part "3. the trainer compiled: 10 steps and a save, then a second process resumes to 20"
EXP=tiny OUTPUT_DIR=/tmp/rehearsal-runs/compiled run 150 train \
  "${TRAIN[@]}" training.compile=true training.max_steps=10 training.save_steps=10
EXP=tiny OUTPUT_DIR=/tmp/rehearsal-runs/compiled run 90 train \
  "${TRAIN[@]}" training.compile=true training.max_steps=20 training.save_steps=10

part "4. the step at the real sizes, Qwen3-1.7B: mosa vs naive, then mosa and moe eager vs compiled"
run 300 bench-1.7b "$PYTHON" -m tools.bench.step "${BENCH17[@]}" --projector mosa --compile-projectors mosa,moe \
  --json-out "$OUT/bench-1.7b.json"

part "done"
grep -hE "^(Step|Eval|checkpoint|resum|torch.compile)" "$OUT/train.log" | tee -a "$OUT/summary.txt"
exit "$status"
