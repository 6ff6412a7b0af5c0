#!/usr/bin/env bash
# The one prepared GPU check (one H100 or H200): both benchmarks at full size, the fast path against the
# reference simulator, and the kernel tests on the GPU. Everything it writes goes under $OUT.
#
#   OUT=/tmp/device bash benchmarks/run_device.sh
#   OUT=/tmp/device CHECKPOINT=runs/full/stage2.pt DATA_ROOT=.cifar bash benchmarks/run_device.sh
#
# SpikingJelly is installed from the wheels in .whl/ when that folder is present. Each step has its own
# time limit (the limits add up to 8 minutes); a step that fails or runs out of time is
# reported and the others still run. Exit code 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
if [ -d .whl ] && ! $PY -c "import spikingjelly" 2>/dev/null; then
  $PY -m pip install --no-index --find-links .whl spikingjelly > "$OUT/pip.txt" 2>&1 \
    || echo "could not install spikingjelly from .whl/ (see $OUT/pip.txt)"
fi

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output in $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $name failed with exit code $rc (124: out of time)"
    status=1
  fi
}

step simulate 150 $PY benchmarks/bench_simulate.py --cuda-graph --out "$OUT/simulate.json"
step train 150 $PY benchmarks/bench_train.py --compile --out "$OUT/train.json"
if [ -n "${CHECKPOINT:-}" ]; then
  step check 100 $PY benchmarks/check_fast_path.py --checkpoint "$CHECKPOINT" --data-root "${DATA_ROOT:-.cifar}" \
    --out "$OUT/check.json"
else
  step check 100 $PY benchmarks/check_fast_path.py --out "$OUT/check.json"
fi
step kernel_tests 80 $PY -m pytest tests/test_kernels.py -q -p no:cacheprovider
echo "== done; results in $OUT"
exit $status
