#!/usr/bin/env bash
# The one prepared GPU check (one H100 or H200): both benchmarks at full size, the fast path against the
# reference simulator, and the kernel tests on the GPU. Everything it writes goes under $OUT.
#
#   OUT=/tmp/device bash benchmarks/run_device.sh
#   OUT=/tmp/device CHECKPOINT=runs/full/stage2.pt DATA_ROOT=.cifar bash benchmarks/run_device.sh
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/run_device.sh   # the same steps, tiny, on the CPU (CI runs this)
#
# SpikingJelly is installed from the wheels in .whl/ (git-ignored) when that folder is present; fetch
# them on a machine with a package index: pip download --no-deps -d .whl spikingjelly==2.0.0 loguru==0.7.3
# Each step has its own time limit (8 minutes in all); a step that fails or runs out of time is
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
  # Offline machine, environment not ours: unpack the wheels (spikingjelly, loguru) into a folder of
  # their own without resolving dependencies; torch, torchaudio and the rest are already there.
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/annsnn-site .whl/*.whl > "$OUT/pip.txt" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/annsnn-site"
  else
    echo "could not install the wheels in .whl/ (see $OUT/pip.txt)"
  fi
fi
$PY -c "import spikingjelly.activation_based.neuron" 2>/dev/null \
  || echo "SpikingJelly is not importable: the simulation benchmark will skip it (put its wheel and loguru's in .whl/)"

SIZE=""        # full size on the GPU
KERNELS=env   # the kernel steps run as they are
if [ -n "${SMOKE:-}" ]; then
  SIZE=--smoke                     # tiny networks on the CPU
  KERNELS="env TRITON_INTERPRET=1"  # Triton kernels through its interpreter
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

step simulate 150 $PY benchmarks/bench_simulate.py $SIZE --cuda-graph --out "$OUT/simulate.json"
step train 150 $PY benchmarks/bench_train.py $SIZE --compile --out "$OUT/train.json"
if [ -n "${CHECKPOINT:-}" ]; then
  step check 100 $KERNELS $PY benchmarks/check_fast_path.py $SIZE --checkpoint "$CHECKPOINT" \
    --data-root "${DATA_ROOT:-.cifar}" --out "$OUT/check.json"
else
  step check 100 $KERNELS $PY benchmarks/check_fast_path.py $SIZE --out "$OUT/check.json"
fi
step kernel_tests 80 $KERNELS $PY -m pytest tests/test_kernels.py -q -p no:cacheprovider
echo "== done; results in $OUT"
exit $status
