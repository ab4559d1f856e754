#!/usr/bin/env bash
# Issue 7's GPU figures on one H100, in three parts that each fit one 10-minute device call. From the
# repository root, with ../shared/data present:
#   bash benchmarks/gpu_speed.sh OUT_DIR step        # the training step alone, each lever before and after
#   bash benchmarks/gpu_speed.sh OUT_DIR e2e         # the same step fed from disk by our loader
#   bash benchmarks/gpu_speed.sh OUT_DIR imagenette  # the fast recipe on real photos at 128 px, 5 and 20 epochs
# Every JSON carries the command, GPU, driver and versions; copy OUT_DIR's files to benchmarks/results/.
set -uo pipefail
out=${1:?output folder}; part=${2:?step, e2e or imagenette}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$out"
cli="python3 -m imagenet_resnet"
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv > "$out/gpu.txt"
nproc >> "$out/gpu.txt"

pack() {  # $1: short side. Imagenette2-224 packed in /tmp on the device's local disk.
    [ -f "/tmp/inette$1/packed/train.index.npz" ] ||
        $cli prepare ../shared/data/imagenette2-224 --out "/tmp/inette$1" --pack --short-side "$1" > "$out/prepare$1.txt" 2>&1
}

case $part in
step)
    # Baseline: bf16 autocast, channels_last, foreach SGD, eager, batch 256.
    $cli bench train --res 224 192 160 --json "$out/step_eager.json"
    $cli bench train --res 224 --no-channels-last --json "$out/step_contiguous.json"
    $cli bench train --res 224 --precision fp32 --json "$out/step_fp32_tf32.json"
    $cli bench train --res 224 --fused --json "$out/step_fused_sgd.json"
    $cli bench train --res 224 --batch-size 128 384 --fused --json "$out/step_batch.json"
    $cli bench train --res 224 192 160 --compile default --fused --json "$out/step_compile_default.json"
    # CUDA graphs (reduce-overhead), and BN+ReLU fusion as inductor's max-autotune does it without graphs.
    $cli bench train --res 224 --compile reduce-overhead --fused --json "$out/step_compile_cudagraphs.json"
    $cli bench train --res 224 --compile max-autotune-no-cudagraphs --fused --steps 30 --json "$out/step_compile_autotune.json"
    ;;
e2e)
    pack 256
    for workers in 16 8 4; do
        $cli bench e2e --data /tmp/inette256 --res 224 --workers $workers --fused --json "$out/e2e_224_w$workers.json"
    done
    $cli bench e2e --data /tmp/inette256 --res 160 --workers 16 --fused --json "$out/e2e_160_w16.json"
    $cli bench e2e --data /tmp/inette256 --res 160 --workers 16 --fused --compile default --json "$out/e2e_160_w16_compile.json"
    ;;
imagenette)
    pack 146  # 128 px crops from the centre 87.5% at evaluation
    for epochs in 5 20; do
        rm -rf "/tmp/inette-r50-$epochs"  # a new run needs a new or empty --out (a rerun on a warm machine)
        $cli train --data /tmp/inette146 --out "/tmp/inette-r50-$epochs" --recipe recipes/resnet50_ffcv16.yaml \
            --epochs $epochs --batch-size 128 --set data.train_size=128 --set data.progressive_start_size=0 \
            --set data.eval_size=128 --set schedule.peak_epoch=1 --set optim.lr=0.5 --set optim.fused=true \
            --set data.workers=16 --set train.log_every_steps=0 > "$out/imagenette_$epochs.txt" 2>&1
        cp "/tmp/inette-r50-$epochs/metrics.jsonl" "$out/imagenette_${epochs}_metrics.jsonl"
    done
    ;;
*) echo "unknown part $part: step, e2e or imagenette" >&2; exit 2 ;;
esac
