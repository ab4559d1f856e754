#!/usr/bin/env bash
# Imagenette top-1 of a recipe over several seeds, against fastai's leaderboard (docs/accuracy.md): packs
# SOURCE once (OUT/prepared), trains one run per seed (OUT/runs-RECIPE/seed-N) and writes one JSON record
# (OUT/RECIPE.json, or --json PATH). Rerun it to resume: finished seeds are read, not trained again.
#   bash benchmarks/imagenette.sh SOURCE OUT RECIPE [bench accuracy options]
#   bash benchmarks/imagenette.sh ../shared/data/imagenette2-224 /tmp/inette recipes/imagenette_128_5ep.yaml --seeds 0 1 2
# SOURCE: an Imagenette tree (train/<wnid>/, val/<wnid>/) or an already prepared folder. The packed copy's short
# side is SHORT_SIDE (default 160: 128 px crops, and the centre 87.5% at evaluation, come from more pixels than they
# show) at JPEG QUALITY (default 90). The leaderboard trains from imagenette2-320 (short side 320).
set -euo pipefail
source=${1:?SOURCE folder}; out=${2:?output folder}; recipe=${3:?recipe}; shift 3
cli=${CLI:-imagenet-resnet}
name=$(basename "$recipe" .yaml)
if [ -f "$source/prepared.json" ]; then
    data=$source
else
    data=$out/prepared
    [ -f "$data/packed/val.index.npz" ] ||
        $cli prepare "$source" --out "$data" --pack --short-side "${SHORT_SIDE:-160}" --quality "${QUALITY:-90}"
fi
json=$out/$name.json
for arg in "$@"; do [ "$arg" = --json ] && json=; done
$cli bench accuracy --data "$data" --recipe "$recipe" --runs-dir "$out/runs-$name" --dataset "$(basename "$source")" \
    ${json:+--json "$json"} "$@"
