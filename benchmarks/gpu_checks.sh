#!/usr/bin/env bash
# The GPU checks of the core issue, run on a lent H100 from the repository root:
#   bash benchmarks/gpu_checks.sh OUT_DIR DATA_DIR
# DATA_DIR: a class-folder ImageNet subset (train/ and val/). Writes raw results into OUT_DIR.
set -uo pipefail
out=${1:?output folder}; data=${2:?data folder}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"

# torchvision is installed there: the weight-compatibility test runs instead of skipping.
python3 -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_presets.py tests/test_engine.py \
  tests/test_data.py 2>&1 | tee "$out/pytest_gpu.txt"

# The training step alone, synthetic data on the GPU: eager at three resolutions, then torch.compile.
python3 -m imagenet_resnet bench train --res 224 192 160 --json "$out/bench_train_eager.json"
python3 -m imagenet_resnet bench train --res 224 --compile default --json "$out/bench_train_compile.json"

# ResNet-50 end to end from JPEG files on disk: 16 loader workers, bf16, channels_last, batch 256.
python3 -m imagenet_resnet train --data "$data" --out /tmp/r50 --recipe recipes/resnet50_onecycle40.yaml \
  --epochs 6 --batch-size 256 --set data.workers=16 --set train.log_every_steps=5 2>&1 | tee "$out/train_r50.txt"
cp /tmp/r50/metrics.jsonl "$out/train_r50_metrics.jsonl"
python3 -m imagenet_resnet evaluate --json --checkpoint /tmp/r50/last.pt --data "$data" --workers 16 | tee "$out/evaluate_r50.json"
