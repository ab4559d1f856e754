"""Where and how the network runs: device, precision, backend flags, memory layout, compilation.

Training, serving and the benchmarks all take these from here, so one setting means one thing everywhere.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but PyTorch sees no CUDA GPU; use --set train.device=cpu")
    return device


BF16_NATIVE_FROM = (8, 0)  # Ampere (A100, A10, RTX 30xx) and later have bf16 tensor cores; T4 (7.5), V100 (7.0) do not


def auto_precision(device_type: str, capability: tuple[int, int] | None = None) -> str:
    """What `precision: auto` means for a device: bf16 where the GPU computes it natively (no loss scaling
    needed), fp16 with the loss scaler on older GPUs (their tensor cores take fp16), fp32 on the CPU.
    `torch.cuda.is_bf16_supported()` is not the test: it is true on a T4 or V100 too, where bf16 is emulated
    at a fraction of fp16's speed."""
    if device_type != "cuda":
        return "fp32"
    return "bf16" if capability is not None and tuple(capability) >= BF16_NATIVE_FROM else "fp16"


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision a run uses on `device`; `auto` as auto_precision says. bf16 asked for on a GPU without
    native bf16 runs as asked, with a warning."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if name == "auto":
        return auto_precision(device.type, capability)
    if name == "bf16" and device.type == "cuda" and auto_precision("cuda", capability) != "bf16":
        warnings.warn(f"train.precision=bf16 on {torch.cuda.get_device_name(device)} (compute capability "
                      f"{capability[0]}.{capability[1]}): bf16 is emulated there, much slower than fp16; "
                      "use --set train.precision=auto (fp16 with loss scaling)")
    return name


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def set_backend_flags(deterministic: bool = False) -> None:
    """Bitwise-reproducible kernels, or the fastest ones: cuDNN's autotuner for the fixed input shapes and
    TF32 matrix maths on Ampere and later GPUs."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC (channels_last) is the layout tensor cores want; NCHW is PyTorch's default."""
    return torch.channels_last if channels_last else torch.contiguous_format


def compile_model(model: torch.nn.Module, mode: str, backend: str = "inductor") -> torch.nn.Module:
    """`mode` as train.compile takes it: "" = not compiled, "default", or any torch.compile mode name.

    Static shapes (`dynamic=False`): each input shape gets a graph of its own. By default torch.compile turns
    the graph dynamic at the second shape it sees, so progressive resizing (and the evaluation size) would
    run the rest of the run through a slower dynamic-shape graph. A run sees a handful of sizes (progressive
    resizing moves in steps of 32), well inside dynamo's recompile limit."""
    if not mode:
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, backend=backend, dynamic=False)
