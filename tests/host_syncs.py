"""Counting, on the CPU, the calls that would make the host wait for a GPU.

A GPU runs the work the host queued while the host queues more; a call that needs a result on the host
(`.item()`, `.tolist()`, `bool(tensor)`, a copy without `non_blocking`, a data-dependent shape) makes the host
wait until the GPU has caught up, and the GPU then idles until the host queues again. On a CPU nothing waits,
so such calls are invisible there: this mode, active around some code, records each one of them with the line
of our package that made it. `torch.cuda.set_sync_debug_mode("error")` is the GPU's own check of the same.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode

# Read a tensor's value on the host.
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
         torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
# Results whose size depends on the data: the host must wait to know it.
DATA_DEPENDENT = {torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select, torch.masked_select,
                  torch.unique, torch.Tensor.unique}
HOST_DATA = {torch.from_numpy, torch.tensor, torch.as_tensor}  # tensors made from host data (Python, numpy)
COPIES = {torch.Tensor.to, torch.Tensor.cuda}


def _names_a_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])


class HostSyncs(TorchFunctionMode):
    """`with HostSyncs() as syncs: ...` then `syncs.calls`: (what, where in our package) for each call that
    would block the host on a GPU: a read of a tensor's value, a result whose size depends on the data, and a
    copy of host data (made from Python or numpy values) to a device without `non_blocking` (or made there at
    once with `torch.tensor(..., device=...)`). Copies between device tensors are not counted: on the CPU
    there is no telling them apart from the no-op copy of a tensor to the device it is on."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.host_born: dict[int, torch.Tensor] = {}  # by id, held so that no id is reused meanwhile

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        blocking = (func in READS or func in DATA_DEPENDENT
                    or (func in HOST_DATA and "device" in kwargs)
                    or (func in COPIES and id(args[0]) in self.host_born and not kwargs.get("non_blocking")
                        and (func is torch.Tensor.cuda or _names_a_device(args, kwargs)))
                    or (func is torch.Tensor.copy_ and id(args[1]) in self.host_born and not kwargs.get("non_blocking"))
                    or (func is torch.Tensor.__getitem__ and _boolean_mask(args)))
        if blocking:
            self.calls.append((getattr(func, "__name__", str(func)), _our_caller()))
        result = func(*args, **kwargs)
        if func in HOST_DATA and "device" not in kwargs:
            self.host_born[id(result)] = result
        return result


def _boolean_mask(args) -> bool:
    index = args[1] if len(args) > 1 else None
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _our_caller() -> str:
    """The innermost line of our package on the stack, and the line that made the call when it is not ours."""
    frames = traceback.extract_stack()[:-3]
    ours = [f for f in frames if "imagenet_resnet" in f.filename] or frames
    where = f"{ours[-1].filename.split('src/')[-1]}:{ours[-1].lineno} {ours[-1].line}"
    return where if ours[-1] is frames[-1] else f"{where} (in {frames[-1].filename}:{frames[-1].lineno})"
