#!/usr/bin/env bash
# The GPU correctness checks, in one device call of about 7 minutes, from the repository root on a lent GPU:
#   bash benchmarks/gpu_checks.sh OUT [DATA]
# 1. tests/test_cuda.py (marked `cuda`): a CUDA run stopped by train.stop_at_step and resumed, and one stopped
#    by SIGTERM and resumed, each bitwise equal to an uninterrupted run (EMA, Mixup/CutMix, clipping, mid-epoch
#    checkpoints on); a bf16 run resumed in fp16 with the fused SGD and AdamW (the scaler afresh, the optimizer's
#    build flags this machine's); 20 steps of the loop's step with EMA and Mixup under
#    torch.cuda.set_sync_debug_mode("error"); bf16 and fp16 steps; torch.compile at two resolutions; the class
#    heat map computed as CAM (no backward pass, as serve and the ZeroGPU Space do) equal to Grad-CAM on the GPU. Then the
#    CPU-side tests that use torchvision where it imports (the device image has it).
# 2. bench train: the loop's step alone and with EMA + Mixup + CutMix, ResNet-50 at 224 px, eager: the cost of
#    the per-step extras, which used to sync the host every step.
# 3. With DATA (a class-folder or prepared ImageNet subset): ResNet-50 trained end to end for 2 epochs, stopped
#    at step 1 and resumed on the GPU at half the batch (the resume chooses 2 steps of accumulation to keep the
#    global batch: the GPU's name in the run's shape, BatchNorm's frozen statistics on CUDA), and evaluated
#    (ReaL and calibration from predictions gathered per image on the GPU, with the plots);
#    30 compiled steps with 2 micro-batches each; then --budget 90s: its dry-run (steps timed with CUDA
#    syncs) and a budgeted imagenette_128_20ep run that must end within 90 s with its fit run to the end.
# Writes the raw outputs into OUT and OUT/gpu_checks.json (command, GPU, versions, each part's exit status).
# Not covered on one GPU: NCCL between processes: the step's image count summed on the device (async, waited for
# by the stream) and a stand-in micro-batch where a process has fewer than two readable images
# (training/step.py); tests/test_host_agreement.py runs the same code over gloo on the CPU.
# Tried on a machine without a GPU as far as it goes (the CUDA sync check left out, small benchmark sizes):
#   GPU_CHECKS_DEVICE=cpu GPU_CHECKS_BENCH="--device cpu --model resnet18 --res 64 --batch-size 16 --steps 3
#   --warmup 1" bash benchmarks/gpu_checks.sh OUT
set -uo pipefail
out=${1:?output folder}; data=${2:-}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
CLI="python3 -m imagenet_resnet"
bench=(${GPU_CHECKS_BENCH:---res 224 --steps 30 --warmup 10})
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$out/gpu.txt"
status=()

python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs > "$out/pytest_cuda.txt" 2>&1
status+=("pytest_cuda=$?")
tail -n 3 "$out/pytest_cuda.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_presets.py tests/test_engine.py \
  tests/test_device_paths.py > "$out/pytest_cpu_side.txt" 2>&1
status+=("pytest_cpu_side=$?")
tail -n 3 "$out/pytest_cpu_side.txt"

$CLI bench train "${bench[@]}" --json "$out/bench_train_step.json" > "$out/bench.txt" 2>&1
status+=("bench_train_step=$?")
$CLI bench train "${bench[@]}" --ema-decay 0.9999 --mixup 0.2 --cutmix 1.0 \
  --json "$out/bench_train_step_ema_mix.json" >> "$out/bench.txt" 2>&1
status+=("bench_train_step_ema_mix=$?")
cat "$out/bench.txt"

if [ -n "$data" ]; then
  run=/tmp/gpu-checks-r50
  rm -rf "$run"
  r50=(--data "$data" --out "$run" --recipe resnet50_onecycle40 --epochs 2 --batch-size 256
       --set data.workers=16 --set train.log_every_steps=5 --set train.ema_decay=0.999)
  $CLI train "${r50[@]}" --set train.stop_at_step=1 > "$out/train_r50.txt" 2>&1
  status+=("train_r50_stop=$?")
  $CLI train "${r50[@]}" --resume --batch-size 128 >> "$out/train_r50.txt" 2>&1
  status+=("train_r50_stop_resume=$?")
  grep -q "continues as 1 process(es) x batch 128 x accumulation 2" "$out/train_r50.txt"
  status+=("train_r50_resumed_at_half_batch=$?")
  cp "$run/metrics.jsonl" "$out/train_r50_metrics.jsonl"
  # torch.compile with accumulation: the step's later micro-batches freeze BatchNorm's running statistics
  # (track_running_stats toggled), which should cost one recompile, not one per step.
  rm -rf /tmp/gpu-checks-compile-accum  # a new run needs a new or empty --out (a rerun on a warm machine)
  $CLI train --data "$data" --out /tmp/gpu-checks-compile-accum --recipe imagenette_128_20ep --epochs 1 \
    --set train.compile=default --set train.accumulation_steps=2 --set train.stop_at_step=30 \
    --set data.workers=16 > "$out/train_compile_accumulation.txt" 2>&1
  status+=("train_compile_accumulation=$?")
  $CLI evaluate --json --ema --checkpoint "$run/last.pt" --data "$data" --workers 16 --plots "$out/evaluate_plots" \
    > "$out/evaluate_r50.json"
  status+=("evaluate_r50=$?")
  # The per-image path on CUDA (predictions copied to the host per batch): ReaL, as Imagenette's photos are
  # ImageNet validation files, and calibration over every image.
  python3 -c "import json, sys; r = json.load(open(sys.argv[1])); \
assert r['real']['images'] > 0 and sum(b['images'] for b in r['calibration']['bins']) == r['images'], r" \
    "$out/evaluate_r50.json" > "$out/evaluate_r50_check.txt" 2>&1
  status+=("evaluate_r50_real_calibration=$?")
  # A GPU index that is not here: one line naming how many there are and this command's --device (exit 2).
  $CLI evaluate --device gpu:99 --checkpoint "$run/last.pt" --data "$data" > "$out/device_refused.txt" 2>&1
  [ $? -eq 2 ] && grep -q "this machine has .* GPU" "$out/device_refused.txt" && grep -q -- "--device cpu" "$out/device_refused.txt"
  status+=("device_index_refused=$?")
  # --budget on the GPU: the dry-run times each resolution (CUDA syncs around the timed steps), and a
  # budgeted run must end within its budget, its fit run to the end.
  $CLI train --data "$data" --recipe imagenette_128_20ep --budget 90s --dry-run --set data.workers=16 \
    > "$out/budget_dry_run.txt" 2>&1
  status+=("budget_dry_run=$?")
  # Its memory line reads the GPU's free memory (training/memory.py, torch.cuda.mem_get_info), said before the
  # timing; on a CPU only tests/test_dry_run.py's host-memory path runs.
  grep -q "^memory: .*free on the GPU" "$out/budget_dry_run.txt" \
    && [ "$(grep -n '^memory:' "$out/budget_dry_run.txt" | head -1 | cut -d: -f1)" -lt \
         "$(grep -n 'a step takes' "$out/budget_dry_run.txt" | head -1 | cut -d: -f1)" ]
  status+=("dry_run_gpu_memory_before_timing=$?")
  brun=/tmp/gpu-checks-budget
  rm -rf "$brun"
  $CLI train --data "$data" --out "$brun" --recipe imagenette_128_20ep --budget 90s --set data.workers=16 \
    --set train.log_every_steps=0 > "$out/train_budget.txt" 2>&1
  status+=("train_budget=$?")
  python3 -c "import sys, torch; p = torch.load(sys.argv[1], weights_only=True)['progress']; \
assert p['budget_used_seconds'] <= 90 and p['global_step'] == p['total_steps'], p" "$brun/last.pt" \
    >> "$out/train_budget.txt" 2>&1
  status+=("train_budget_on_time=$?")
fi

python3 - "$out" "$0 $*" "${status[@]}" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "src")
from imagenet_resnet.bench.record import environment
out, command, parts = Path(sys.argv[1]), sys.argv[2], dict(s.split("=") for s in sys.argv[3:])
record = {"command": f"bash {command}", "environment": environment(),
          "exit_status": {name: int(code) for name, code in parts.items()},
          "pytest_cuda": (out / "pytest_cuda.txt").read_text().strip().splitlines()[-1:],
          "bench": [json.loads(line) for line in (out / "bench.txt").read_text().splitlines() if line.startswith("{")]}
(out / "gpu_checks.json").write_text(json.dumps(record, indent=1) + "\n")
print(json.dumps(record["exit_status"]))
PY
