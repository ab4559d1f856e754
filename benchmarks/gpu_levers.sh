#!/usr/bin/env bash
# Training-step levers on one GPU, each measured with `imagenet-resnet bench train` (synthetic data on the GPU),
# plus a longer ResNet-50 run from JPEG files. Usage, from the repository root:
#   bash benchmarks/gpu_levers.sh OUT_DIR DATA_DIR
set -uo pipefail
out=${1:?output folder}; data=${2:?data folder}
export PYTHONPATH=src PYTHONUNBUFFERED=1
bench="python3 -m imagenet_resnet bench train"
$bench --res 224 --no-channels-last --json "$out/lever_contiguous.json"
$bench --res 224 --batch-size 128 256 384 --json "$out/lever_batch.json"
$bench --res 224 --fused --json "$out/lever_fused.json"
$bench --res 224 --precision fp16 --fused --json "$out/lever_fp16.json"
$bench --res 224 160 --compile default --fused --json "$out/lever_compile_default.json"
$bench --res 224 --compile reduce-overhead --fused --json "$out/lever_compile_cudagraphs.json"
# ResNet-50 from scratch on 3,500 Imagenette photos: does it learn on the GPU?
python3 -m imagenet_resnet train --data "$data" --out /tmp/r50long --model resnet50 --epochs 30 --batch-size 128 \
  --set data.workers=16 --set optim.lr=0.2 --set optim.label_smoothing=0.1 --set schedule.name=onecycle \
  --set train.log_every_steps=0 --set optim.fused=true 2>&1 | tee "$out/train_r50_30ep.txt"
cp /tmp/r50long/metrics.jsonl "$out/train_r50_30ep_metrics.jsonl"
