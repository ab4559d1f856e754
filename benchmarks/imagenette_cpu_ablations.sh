#!/usr/bin/env bash
# The CPU stand-in for the Imagenette recipe search (docs/accuracy.md): ResNet-18 at a quarter of its width
# (model.width=16), 64 px crops, 5 epochs, batch 64, over all of Imagenette; every arm changes one thing from
# the base, which is issue 12's best measured GPU setting. About 3 min per run on 2 cores (ResNet-50 at that
# width takes four times as long: too slow for a search on 2 cores).
#   bash benchmarks/imagenette_cpu_ablations.sh DATA OUT [ARM ...]     (all arms when none is named)
# DATA: a prepared Imagenette folder (benchmarks/imagenette.sh makes one). SEEDS="0 1" by default.
# Writes OUT/ARM.json, one `bench accuracy` record per arm, and prints a table.
set -euo pipefail
data=${1:?prepared folder}; out=${2:?output folder}; shift 2
seeds=${SEEDS:-0 1}
cli=${CLI:-imagenet-resnet}
base=(--model resnet18 --epochs 5 --batch-size 64
      --set model.width=16 --set model.channels_last=false --set model.blurpool=true
      --set data.train_size=64 --set data.eval_size=64 --set data.crop_scale=[0.35,1.0] --set data.workers=2
      --set optim.lr=0.5 --set optim.weight_decay=1e-4 --set optim.label_smoothing=0.1
      --set schedule.name=linear --set schedule.start_factor=1e-4 --set schedule.peak_epoch=1
      --set train.device=cpu --set train.log_every_steps=0)
declare -A arms=(
    [base]=""
    [variant-d]="--set model.variant=d"
    [variant-c]="--set model.variant=c"
    [no-blurpool]="--set model.blurpool=false"
    [nesterov]="--set optim.nesterov=true"
    [lr-1.0]="--set optim.lr=1.0"
    [lr-0.25]="--set optim.lr=0.25"
    [wd-5e-5]="--set optim.weight_decay=5e-5"
    [wd-5e-4]="--set optim.weight_decay=5e-4"
    [batch-32]="--batch-size 32"
    [crop-0.25]="--set data.crop_scale=[0.25,1.0]"
    [crop-0.5]="--set data.crop_scale=[0.5,1.0]"
    [onecycle]="--set schedule.name=onecycle --set schedule.pct_start=0.25"
    [flat-cosine]="--set schedule.name=flat-cosine --set schedule.pct_start=0.5 --set schedule.warmup_epochs=1 --set schedule.warmup_start_factor=1e-4"
    [peak-0.5]="--set schedule.peak_epoch=0.5"
    [ema]="--set train.ema_decay=0.99"
    [no-smoothing]="--set optim.label_smoothing=0.0"
    [radam]="--set optim.name=radam --set optim.lr=0.032 --set optim.weight_decay=0.01 --set optim.betas=[0.95,0.99] --set optim.eps=1e-6"
    [adamw]="--set optim.name=adamw --set optim.lr=0.032 --set optim.weight_decay=0.01 --set optim.betas=[0.95,0.99] --set optim.eps=1e-6"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(base variant-d variant-c no-blurpool nesterov lr-1.0 lr-0.25 wd-5e-5 wd-5e-4 batch-32
                                 crop-0.25 crop-0.5 onecycle flat-cosine peak-0.5 ema no-smoothing radam adamw)
mkdir -p "$out"
for name in "${names[@]}"; do
    [ -n "${arms[$name]+set}" ] || { echo "unknown arm $name; arms: ${!arms[*]}" >&2; exit 2; }
    # shellcheck disable=SC2086  # the arm's settings are words on purpose
    $cli bench accuracy --data "$data" "${base[@]}" ${arms[$name]} --seeds $seeds --runs-dir "$out/runs-$name" \
        --dataset imagenette2-224 --json "$out/$name.json" > /dev/null
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]:14s} mean {r['val_top1_mean']:.4f}  \" + ' '.join(f\"{x['val_top1']:.4f}\" for x in r['runs']) + (f\"  EMA \" + ' '.join(f\"{x['val_top1_ema']:.4f}\" for x in r['runs']) if 'val_top1_ema' in r['runs'][0] else ''))" "$out/$name.json" "$name"
done
