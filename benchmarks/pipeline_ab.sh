#!/usr/bin/env bash
# A/B of the data pipeline: the same model, schedule and seeds trained on images made four ways, to rule out
# an accuracy loss in our fast loader (docs/accuracy.md has the results):
#   packed      our fast pipeline on the packed copy (re-encoded JPEGs, short side capped)
#   fast        our fast pipeline on the original files (reduced-size DCT decode, fast IDCT when training)
#   full        our crop and resize from a full-size, accurate decode of the original files
#   reference   torchvision's RandomResizedCrop/flip and Resize/CenterCrop on PIL-decoded original files
# Every run's final weights are also evaluated through all three eval paths (`eval_check` in each record).
# At one seed all arms draw the same crops and flips; only how the pixels are made differs.
#
#   bash benchmarks/pipeline_ab.sh SOURCE OUT_DIR cpu   # ResNet-18 at width 16, 64 px, 5 epochs (~1 h on 2 cores)
#   bash benchmarks/pipeline_ab.sh SOURCE OUT_DIR gpu   # ResNet-50, 128 px, 5 epochs (minutes on one H100)
# SOURCE: an Imagenette tree (train/<wnid>/, val/<wnid>/), e.g. ../shared/data/imagenette2-224.
# Writes OUT_DIR/ab-ARM.json, one `bench accuracy` record per arm; SEEDS="0 1 2" by default.
set -euo pipefail
source=${1:?SOURCE folder}; out=${2:?output folder}; scale=${3:?cpu or gpu}
seeds=${SEEDS:-0 1 2}
here=$(cd "$(dirname "$0")/.." && pwd)
cli=${CLI:-imagenet-resnet}
mkdir -p "$out"
data="$out/prepared"
[ -f "$data/packed/val.index.npz" ] || $cli prepare "$source" --out "$data" --pack --short-side 128 --quality 70

case $scale in
cpu) settings=(--model resnet18 --set model.width=16 --set model.channels_last=false --set data.train_size=64
               --set data.eval_size=64 --set data.workers=2 --set train.device=cpu) ;;
gpu) settings=(--model resnet50 --set data.train_size=128 --set data.eval_size=128 --set optim.fused=true) ;;
*) echo "scale must be cpu or gpu" >&2; exit 2 ;;
esac
# One fixed recipe for every arm: what matters is that the arms differ only in the pipeline. The records of
# docs/accuracy.md were made before the recipe took ResNet-D: variant b keeps them reproducible.
settings+=(--recipe "$here/recipes/imagenette_128_5ep.yaml" --set model.variant=b --set train.log_every_steps=0)

arm() {  # $1: arm name; the rest: its settings
    local name=$1; shift
    $cli bench accuracy --data "$data" "${settings[@]}" "$@" --seeds $seeds --runs-dir "$out/runs-$name" \
        --eval-pipelines fast full-decode reference --dataset "$(basename "$source")" --json "$out/ab-$name.json" > /dev/null
}
arm packed
arm fast --set data.packed=false
arm full --set data.packed=false --set data.pipeline=full-decode
arm reference --set data.packed=false --set data.pipeline=reference
python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path
for arm in ("packed", "fast", "full", "reference"):
    r = json.loads((Path(sys.argv[1]) / f"ab-{arm}.json").read_text())
    tops = " ".join(f"{x['val_top1']:.4f}" for x in r["runs"])
    print(f"{arm:10s} {r['pipeline']:40s} mean {r['val_top1_mean']:.4f} std {r['val_top1_std']:.4f}  ({tops})")
EOF
