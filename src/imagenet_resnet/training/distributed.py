"""Multi-process training under torchrun: rank and device from the environment, NCCL on GPUs, gloo on CPU.

A single process (no torchrun) gets world size 1 and every helper here is a no-op, so the training loop
reads the same either way. Only rank 0 logs and writes files; every rank reads checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runtime import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Small agreements between processes that the host needs at once (a micro-batch's size) go over gloo, on the
# host: over NCCL they would need a device tensor and a host-device sync to read the answer.
_host_group = None


def init(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), and pick
    this process's device: cuda:LOCAL_RANK, so no process lands on GPU 0 by mistake."""
    global _host_group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), resolve_device(device_name)
    info = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torchrun's store outlives a restart; keys under a prefix per restart keep the new workers from
        # finding the dead ones' addresses (seen with gloo: "connection refused" on the restarted job).
        store, rank, world_size = next(dist.rendezvous("env://"))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                store=dist.PrefixStore(f"imagenet-resnet/restart-{restart}/", store))
        _host_group = dist.new_group(backend="gloo")  # on CPU runs too: the same path as a GPU run's, tested
    return info, device


def shutdown() -> None:
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def host_all_gather(values: list[int]) -> list[list[int]]:
    """Every process's `values` (lists of the same length), in rank order, exchanged on the host."""
    if not dist.is_initialized():
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine, group=_host_group)
    return [t.tolist() for t in everyone]


def host_broadcast(values: list[float]) -> list[float]:
    """Rank 0's `values` on every process, exchanged on the host (no GPU sync): a decision rank 0 made."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(t, src=0, group=_host_group)
    return t.tolist()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over all processes (float64: counts stay exact up to 2**53)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: int, device: torch.device) -> int:
    """The largest value of `flag` over all processes: every rank agrees, e.g. to stop at the same step."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([flag], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics (each rank updated its own copy on its own
    batches since DDP last broadcast them), so evaluation on any rank matches the checkpoint rank 0 saves."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
