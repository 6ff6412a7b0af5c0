#!/usr/bin/env bash
# The full-size reproduction (CIFAR-10, VGG-16) on one GPU, run from the repository root.
#
#   DATA=.cifar/cifar10_jpeg.npz OUT=/some/dir bash tools/device_reproduce_full.sh
#
# DATA is an .npz the package reads (encoded images with offsets, or uint8 arrays), a folder with
# train/<class>/ and test/<class>/ images, or a folder with torchvision's CIFAR-10 files. NOTE says
# which copy of the data it is; it is stored with every number. Writes OUT/full/ (checkpoints,
# curves.json, curves.png) and OUT/reproduce.log; a second run continues where the first stopped.
# ARGS adds options to `annsnn reproduce` (the tests run it tiny on a CPU with
# ARGS="--epochs 2 --T 4 --device cpu"); PYTHON picks the interpreter (default python3). PROFILE=medium
# runs the middle profile instead (OUT/medium/), whose minutes on a GPU go into the chapters' setup text.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-.cifar/cifar10_jpeg.npz}
OUT=${OUT:-runs}
PY=${PYTHON:-python3}
NOTE=${NOTE:-"offline JPEG re-encoding of CIFAR-10 (pixels differ slightly from the original binaries)"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
PROFILE=${PROFILE:-full}
$PY -m annsnn reproduce --profile "$PROFILE" --data-root "$DATA" --out "$OUT/$PROFILE" --data-note "$NOTE" --quiet \
  ${ARGS:-} 2>&1 | tee "$OUT/reproduce.log"
cp "$OUT/$PROFILE/curves.json" "$OUT/$PROFILE/curves.png" "$OUT/" 2>/dev/null || true
