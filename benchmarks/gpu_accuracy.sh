#!/usr/bin/env bash
# Issue 12's GPU figures in one device call (about 8 min of an H200): the Imagenette recipes at 5 and 20
# epochs over three seeds each, the pipeline A/B at 5 epochs, and the torchvision/timm parity tests.
# The device has no ../shared/data: carry a packed copy made here, in a folder .git/info/exclude ignores:
#   imagenet-resnet prepare ../shared/data/imagenette2-224 --out .gpudata/inette --pack --short-side 128 --quality 70
# then, from the repository root there:
#   bash benchmarks/gpu_accuracy.sh "$OUT" .gpudata/inette
# Up to 8 files come back from OUT: the three records, the A/B records, the test log.
set -uo pipefail
out=${1:?output folder}; data=${2:?packed Imagenette folder}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 CLI="python3 -m imagenet_resnet"
work=/tmp/accuracy
mkdir -p "$out" "$work"
gpu=(--set data.workers=16 --set optim.fused=true --set train.log_every_steps=0)
for recipe in imagenette_128_5ep imagenette_128_20ep; do
    bash benchmarks/imagenette.sh "$data" "$work" "recipes/$recipe.yaml" --seeds 0 1 2 "${gpu[@]}" \
        --eval-pipelines fast full-decode reference --json "$out/$recipe.json" > /dev/null 2>> "$out/log.txt"
done
# The A/B: the same 5-epoch runs with the images made by the other two pipelines (the packed copy only: the
# originals do not fit in a device call).
for pipeline in full-decode reference; do
    $CLI bench accuracy --data "$data" --recipe recipes/imagenette_128_5ep.yaml --seeds 0 1 2 "${gpu[@]}" \
        --set data.pipeline=$pipeline --runs-dir "$work/ab-$pipeline" --dataset imagenette2-224 \
        --json "$out/ab_$pipeline.json" > /dev/null 2>> "$out/log.txt"
done
python3 -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_presets.py > "$out/pytest.txt" 2>&1
tail -n 3 "$out/pytest.txt"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    tops = " ".join(f"{x['val_top1']:.4f}" for x in r["runs"])
    print(f"{path.stem:22s} {r['epochs']:3d} ep  mean {r['val_top1_mean']:.4f} std {r['val_top1_std']:.4f} ({tops})")
PY
