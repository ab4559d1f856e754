"""Where and how the network runs: device, precision, backend flags, memory layout, compilation.

Training, serving and the benchmarks all take these from here, so one setting means one thing everywhere.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but PyTorch sees no CUDA GPU; use --set train.device=cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA (tensor cores, no loss scaling needed) and fp32 on the CPU."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
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
    """`mode` as train.compile takes it: "" = not compiled, "default", or any torch.compile mode name."""
    if not mode:
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, backend=backend)
