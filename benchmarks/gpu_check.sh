#!/usr/bin/env bash
# Issue 17's device check, in one run on one GPU (about 8 minutes): the CUDA tests, the engine and
# fast-lane benchmarks on CUDA, the training overhead with a busy GPU, and the paper-scale lifecycle
# preset when it exists. Every table goes under OUT (default: $OUT, else runs/gpu_check).
#   SMOKE=1 bash benchmarks/gpu_check.sh   # tiny sizes on the CPU, to catch typos before device time
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
run() {  # name, command...: run one step, keep its output, never stop the others
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT/$name.txt"
  local started=$SECONDS
  "$@" >>"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$OUT/$name.txt"
  tail -n 25 "$OUT/$name.txt"
}
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; $PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } \
  >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu
  run tests "$PY" -m pytest -q -p no:cacheprovider tests/core/test_cuda.py tests/core/test_fast_lane.py
  run engine "$PY" benchmarks/bench_engine.py --models gpt2-small --repeats 1 --skip svdvals weightwatcher --device $DEVICE
  run fast_lane "$PY" benchmarks/bench_fast_lane.py --models demo --steps 3 --device $DEVICE
  run overhead "$PY" benchmarks/bench_overhead.py --model demo --rounds 1 --window 10 --every 5 --device $DEVICE
else
  DEVICE=cuda
  run tests "$PY" -m pytest -q -p no:cacheprovider -rs tests/core/test_cuda.py tests/runtime/test_background.py tests/core/test_fast_lane.py
  run engine "$PY" benchmarks/bench_engine.py --models gpt2-small gpt2-medium llama-1b --repeats 2 --device $DEVICE
  run fast_lane "$PY" benchmarks/bench_fast_lane.py --models demo gpt2-small --steps 20 --gpt2-batch 8 --gpt2-seq 1024 --device $DEVICE
  run overhead "$PY" benchmarks/bench_overhead.py --model gpt2-small --batch-size 8 --device $DEVICE
fi
# The paper-scale lifecycle preset (issue 16), when reproduce_lifecycle.py offers it.
if $PY benchmarks/reproduce_lifecycle.py --help 2>/dev/null | grep -q -- "--preset"; then
  if [ "${SMOKE:-0}" = 1 ]; then
    run lifecycle "$PY" benchmarks/reproduce_lifecycle.py --preset smoke --out "$OUT/lifecycle"
  else
    run lifecycle "$PY" benchmarks/reproduce_lifecycle.py --preset paper --device cuda --out "$OUT/lifecycle"
  fi
fi
echo "tables and logs: $OUT"
