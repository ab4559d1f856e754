#!/usr/bin/env bash
# The loader benchmark of issue 3 on full-size ImageNet photos: imagenet-samples-200 (one photo per class,
# 200 classes) repeated into a class-folder tree, prepared and packed, then `bench data`.
# Usage: benchmarks/bench_data.sh [SAMPLES_DIR] [REPEATS] [WORKERS] [JSON]
set -euo pipefail
samples=${1:-../shared/data/imagenet-samples-200}
repeats=${2:-5}
workers=${3:-0}
json=${4:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for f in "$samples"/*.JPEG; do
  name=$(basename "$f"); wnid=${name%%_*}
  mkdir -p "$work/tree/train/$wnid" "$work/tree/val/$wnid"
  for r in $(seq 1 "$repeats"); do ln -s "$(realpath "$f")" "$work/tree/train/$wnid/${name%.JPEG}_$r.JPEG"; done
  ln -s "$(realpath "$f")" "$work/tree/val/$wnid/$name"
done
python -m imagenet_resnet prepare "$work/tree" --out "$work/prepared" --pack
python -m imagenet_resnet bench data --data "$work/prepared" --workers "$workers" ${json:+--json "$json"}
