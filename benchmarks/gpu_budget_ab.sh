#!/usr/bin/env bash
# Issue 21's GPU A/B in one device call (about 7 min of an H200, after gpu_checks.sh and gpu_accuracy.sh):
# ResNet-50 at 128 px, imagenette_128_20ep fitted by --budget to the time imagenette_128_5ep takes, against
# the 20-epoch recipe cut off at that time and the 5-epoch recipe itself, 3 seeds each, and the fit at half
# and twice that time. Carry the packed Imagenette as for gpu_accuracy.sh:
#   imagenet-resnet prepare ../shared/data/imagenette2-224 --out .gpudata/inette --pack --short-side 128 --quality 70
#   bash benchmarks/gpu_budget_ab.sh "$OUT" .gpudata/inette
set -uo pipefail
out=${1:?output folder}; data=${2:?packed Imagenette folder}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$out"
python3 benchmarks/budget_ab.py "$data" /tmp/budget-ab --short-recipe imagenette_128_5ep \
    --long-recipe imagenette_128_20ep --seeds 0 1 2 --set data.workers=16 --set optim.fused=true \
    --json "$out/budget-ab.json" 2> "$out/log.txt" | tee "$out/arms.txt"
