"""Where and how the network runs: device, precision, backend flags, memory layout, how a batch reaches the
device and is normalised there (DeviceNormalize), compilation.

Training, serving and the benchmarks all take these from here, so one setting means one thing everywhere.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .errors import UserError


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str, option: str = "--set train.device") -> torch.device:
    """The device `name` means: auto (CUDA when there is one), cpu, cuda, cuda:N; "gpu" and "gpu:N" as people
    write them are CUDA's. A name torch does not know, or a GPU that is not here, is a UserError whose advice
    names `option`, where the name came from: the config's --set train.device, or a command's --device."""
    def spelled(value: str) -> str:  # as the user writes it: --set train.device=cpu, --device cpu
        return f"{option}={value}" if option.startswith("--set") else f"{option} {value}"

    normalised = name.strip().lower()
    if normalised == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if normalised.split(":")[0] == "gpu":
        normalised = "cuda" + normalised[3:]
    try:
        device = torch.device(normalised)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # the two the project runs on and tests
        raise UserError(f"{spelled(name)}: not a device this runs on; give {DEVICE_CHOICES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f"{spelled(name)}: PyTorch sees no CUDA GPU on this machine; use {spelled('cpu')}")
        if device.index is not None and device.index >= count:
            valid = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise UserError(f"{spelled(name)}: this machine has {count} GPU{'s' if count > 1 else ''} ({valid}); "
                            f"give one of those, or {spelled('cpu')}")
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


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch reads its intra-op thread count from
_threads_set: int | None = None  # what size_cpu_threads last set: a later run in this process may size it again


def size_cpu_threads(device: torch.device, loader_workers: int) -> str:
    """On a CPU run, give the network's ops the cores this process may use less its training loader's workers
    (never fewer than half of them: one worker per core, the default, mostly waits on a full queue), and say
    so for the plan line. torch starts one intra-op thread per core, and an op waits for its slowest thread: a
    core taken by a worker or by another program makes every op wait (3x slower epochs, measured on 2 cores
    beside one busy process). Thread counts the user chose are kept: OMP_NUM_THREADS or MKL_NUM_THREADS, and a
    torch.set_num_threads below this. "" on a GPU run, where the CPU runs no ops of the network."""
    if device.type != "cpu":
        return ""
    chosen = next((f"{name}={os.environ[name]}" for name in THREAD_VARIABLES if os.environ.get(name)), None)
    if chosen:
        return f"{_count(torch.get_num_threads(), 'CPU thread')} (from {chosen})"
    # Under torchrun each of the node's training processes gets its share of the cores, as the loader's do.
    cores = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, cores - loader_workers, cores // 2)
    left = f"{_count(cores, 'core')} for this process less {_count(loader_workers, 'loader worker')}"
    global _threads_set
    current = torch.get_num_threads()
    if current < threads and current != _threads_set:  # a torch.set_num_threads, or one per physical core
        return f"{_count(current, 'CPU thread')} (torch's setting, kept: fewer than the {left})"
    torch.set_num_threads(threads)
    _threads_set = threads
    return f"{_count(threads, 'CPU thread')} ({left}; OMP_NUM_THREADS sets it)"


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC (channels_last) is the layout tensor cores want; NCHW is PyTorch's default."""
    return torch.channels_last if channels_last else torch.contiguous_format


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per RGB channel, of pixels scaled to [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)


class DeviceNormalize:
    """The one way batches reach the device: uint8 NHWC images -> normalised float NCHW, and labels, each
    copied without blocking the host (the loader pins their memory on CUDA, so the copies overlap the work
    already queued). NHWC uint8 permuted to NCHW is already in channels_last layout, so the model gets that
    layout for free; the copy moves a quarter of the bytes of a float batch."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.device, self.channels_last = device, channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if not self.channels_last:
            x = x.contiguous()
        return (x - self.mean) / self.std

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.to(self.device, non_blocking=True)


def compile_model(model: torch.nn.Module, mode: str, backend: str = "inductor") -> torch.nn.Module:
    """`mode` as train.compile takes it: "" = not compiled, "default", or any torch.compile mode name.

    Static shapes (`dynamic=False`): each input shape gets a graph of its own. By default torch.compile turns
    the graph dynamic at the second shape it sees, so progressive resizing (and the evaluation size) would
    run the rest of the run through a slower dynamic-shape graph. A run sees a handful of sizes (progressive
    resizing moves in steps of 32), well inside dynamo's recompile limit."""
    if not mode:
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, backend=backend, dynamic=False)
