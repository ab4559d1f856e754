"""The GPU-only paths on a real GPU: resume, SIGTERM, no host sync per step, bf16 and fp16 steps, compile at
two resolutions. Skipped without CUDA; `bash benchmarks/gpu_checks.sh OUT` runs them on a lent GPU (under 5
minutes with the benchmarks). tests/test_device_paths.py tests the same paths on the CPU.

GPU_CHECKS_DEVICE=cpu runs this file on the CPU instead (CUDA's sync check left out), to try the checks
themselves on a machine without a GPU."""

import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_SETTINGS, sigterm_after, tiny_train_args, train_tiny
from imagenet_resnet.config import load_config
from imagenet_resnet.models import build_model
from imagenet_resnet.runtime import DeviceNormalize, auto_precision, resolve_precision
from imagenet_resnet.training import checkpoint
from imagenet_resnet.training.distributed import Dist
from imagenet_resnet.training.optim import build_optimizer
from imagenet_resnet.training.step import StepSums, TrainStep
from imagenet_resnet.training.stopping import RunStopped
from imagenet_resnet.training.run import build_run

DEVICE = torch.device(os.environ.get("GPU_CHECKS_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU (benchmarks/gpu_checks.sh)")]
ON_GPU = [f"train.device={DEVICE}", "train.precision=auto", "train.log_every_steps=0", "train.tensorboard=false"]
# EMA, Mixup/CutMix, clipping and mid-epoch checkpoints: every piece of state a resume must carry on the GPU.
EVERYTHING = ["train.ema_decay=0.9", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "optim.clip_grad_norm=1.0",
              "train.checkpoint_every_steps=3"]


def _same_state(a, b) -> None:
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


def test_stop_and_resume_on_the_gpu_ends_bitwise_equal(tiny_data, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_tiny(tiny_data, straight, *ON_GPU, *EVERYTHING)
    with pytest.raises(RunStopped):
        train_tiny(tiny_data, stopped, *ON_GPU, *EVERYTHING, "train.stop_at_step=10")
    train_tiny(tiny_data, stopped, *ON_GPU, *EVERYTHING, resume=True)
    _same_state(checkpoint.load(straight / "last.pt"), checkpoint.load(stopped / "last.pt"))


def test_sigterm_mid_run_then_resume_on_the_gpu(tiny_data, tmp_path):
    out = tmp_path / "spot"
    settings = [arg for setting in ON_GPU + EVERYTHING for arg in ("--set", setting)]
    args = tiny_train_args(tiny_data, out, "--epochs", "3", *settings, "--set", "train.log_every_steps=1")
    sigterm_after(args, " step 4/")
    stopped_at = checkpoint.load(out / "last.pt")["progress"]["global_step"]
    resumed = subprocess.run([sys.executable, "-m", "imagenet_resnet", *args, "--resume"], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"(global step {stopped_at})" in resumed.stdout
    straight = tmp_path / "straight"
    train_tiny(tiny_data, straight, *ON_GPU, *EVERYTHING, epochs=3)
    _same_state(checkpoint.load(straight / "last.pt"), checkpoint.load(out / "last.pt"))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_bf16_run_resumes_in_fp16_with_the_fused_optimizer(tiny_data, tmp_path, optimizer):
    """A run trained where `auto` means bf16 (A100/H100/L4), resumed where it means fp16 (T4/V100): the scaler
    starts afresh and the optimizer is fused (fp16 builds it so), whatever the checkpoint's optimizer was."""
    run, settings = tmp_path / "run", [*ON_GPU, f"optim.name={optimizer}", "train.log_every_steps=0"]
    with pytest.raises(RunStopped):
        train_tiny(tiny_data, run, *settings, "train.precision=bf16", "train.stop_at_step=3", epochs=1)
    train_tiny(tiny_data, run, *settings, "train.precision=fp16", epochs=1, resume=True)
    state = checkpoint.load(run / "last.pt")
    assert state["progress"]["global_step"] == 7 and state["scaler"]["scale"] > 0
    assert all(group["fused"] for group in state["optimizer"]["param_groups"]) == (DEVICE.type == "cuda")


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_twenty_steps_with_ema_and_mixup_never_wait_for_the_gpu(tiny_data, precision):
    """The loop's step (forward, backward, update, EMA, Mixup/CutMix, the running sums) under CUDA's own sync
    check, set to raise: any call that makes the host wait for the GPU fails the test. In fp16 the loss
    scaler's found-inf flag stays on the GPU too (the fused SGD takes it)."""
    cfg = load_config(None, [*TINY_SETTINGS, f"data.path={tiny_data}", "train.epochs=1", *ON_GPU,
                             f"train.precision={precision}", "train.ema_decay=0.99", "data.mixup_alpha=0.2",
                             "data.cutmix_alpha=1.0", "optim.clip_grad_norm=1.0", "train.batch_size=6",
                             "data.workers=2"])
    run = build_run(cfg, Dist(), DEVICE)
    batches = iter(run.train_loader)
    steps = [[next(batches)] for _ in range(20)]  # pinned by the loader, as in training
    sums = StepSums(run.device)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for k, micro_batches in enumerate(steps):
            run.optimizer_step(micro_batches, 0.05, k, sums)
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert run.state.ema.updates == 20
    assert sums.fold_into(run.progress, run.model) is None and run.progress.epoch_images == 120


@functools.cache
def _learn(precision: str, steps: int = 40) -> list[float]:
    """The loss per step of a ResNet-18 learning which of five tints a noisy image has (chance: ln 5 = 1.61)."""
    g = torch.Generator().manual_seed(0)
    tints = torch.randint(0, 256, (5, 3), generator=g)
    torch.manual_seed(0)
    model = build_model("resnet18", 5, width=16).to(DEVICE)
    cfg = load_config(None, ["optim.weight_decay=0"])
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=precision == "fp16")
    optimizer = build_optimizer(model, cfg, 0.05, precision)  # fused on the GPU in fp16, as training builds it
    step = TrainStep(model, optimizer, scaler, DeviceNormalize(DEVICE, False), precision, cfg.optim)
    losses = []
    for k in range(steps):
        labels = torch.randint(0, 5, (32,), generator=g)
        noise = torch.randint(-60, 61, (32, 32, 32, 3), generator=g)
        images = (tints[labels].view(32, 1, 1, 3) + noise).clamp(0, 255).to(torch.uint8)
        sums = StepSums(DEVICE)
        step([(images, labels, [])], 0.05, k, sums)
        losses.append(sums.loss.item() / len(labels))
    if precision == "fp16":
        assert math.isfinite(scaler.get_scale())
    return losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_the_gpu_learns_as_fp32_does(precision):
    """Autocast (and for fp16 the loss scaler, whose gradients must be unscaled before the update): the first
    loss agrees with fp32's to 16-bit accuracy, and 40 steps learn the task as fp32's do (measured on the CPU:
    a mean loss of 0.53 over the last 5 steps in fp32, 0.44 in bf16, 0.34 in fp16, from 1.48)."""
    losses, reference = _learn(precision), _learn("fp32")
    assert losses[0] == pytest.approx(reference[0], rel=1e-2)
    assert sum(losses[-5:]) / 5 < 0.6 * math.log(5) and sum(reference[-5:]) / 5 < 0.6 * math.log(5)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a GPU's compute capability")
def test_auto_precision_matches_this_gpu():
    capability = torch.cuda.get_device_capability()
    assert resolve_precision("auto", torch.device("cuda")) == auto_precision("cuda", capability)
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if capability >= (8, 0) else "fp16")


def test_compiled_training_at_two_resolutions(tiny_data, tmp_path):
    """Progressive resizing under torch.compile (inductor): 32 px in epoch 1, 64 px in epoch 2."""
    out = tmp_path / "compiled"
    train_tiny(tiny_data, out, *ON_GPU, "train.compile=default", "data.train_size=64",
               "data.progressive_start_size=32", "data.progressive_start_epoch=0", "data.progressive_end_epoch=1",
               epochs=2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_size"] for r in records] == [32, 64]
    assert all(r["val_top1"] is not None for r in records)
    assert not any(k.startswith("_orig_mod.") for k in checkpoint.load(out / "last.pt")["model"])



def test_the_heat_map_without_a_backward_pass_is_grad_cams_on_the_device():
    """Issue 36: serve, the Gradio Space (whose weights sit on cuda on ZeroGPU) and explain compute the map as CAM
    from one forward pass on the model's device: it must equal Grad-CAM there too (cudnn's and cuBLAS's kernels,
    the einsum on the device), and come back on that device."""
    from imagenet_resnet.serving.gradcam import grad_cam, heat_maps

    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=10, width=16).to(DEVICE).eval()
    images = torch.randn(3, 3, 224, 224, device=DEVICE)
    logits, cam = heat_maps(model, images, "layer4")
    assert cam.device.type == DEVICE.type and cam.shape == (3, 224, 224) and not cam.requires_grad
    torch.testing.assert_close(cam, grad_cam(model, images, logits.argmax(1), "layer4"), atol=1e-3, rtol=1e-3)
