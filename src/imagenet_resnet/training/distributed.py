"""Multi-process training under torchrun: rank and device from the environment, NCCL on GPUs, gloo on CPU.

A single process (no torchrun) gets world size 1 and every helper here is a no-op, so the training loop
reads the same either way. Only rank 0 logs and writes files; every rank reads checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from ..errors import UserError
from ..runtime import resolve_device
from .network import choose_gloo_interface

T = TypeVar("T")


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
        if _spans_nodes() and not os.environ.get("GLOO_SOCKET_IFNAME"):
            choose_gloo_interface(info.is_main)
        # torchrun's store outlives a restart; keys under a prefix per restart keep the new workers from
        # finding the dead ones' addresses (seen with gloo: "connection refused" on the restarted job).
        store, rank, world_size = next(dist.rendezvous("env://"))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"imagenet-resnet/restart-{restart}/", store)
        if device.type == "cuda":
            dist.init_process_group("nccl", rank=rank, world_size=world_size, store=store)
        else:
            _connect_gloo(lambda timeout: dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                                                  store=store, timeout=timeout))
        # The host group, on CPU runs too: the same path as a GPU run's, tested.
        _host_group = _connect_gloo(lambda timeout: dist.new_group(backend="gloo", timeout=timeout))
    return info, device


# gloo connects every pair of processes when a group is made, and where a peer's address cannot be reached it
# retries for the group's whole timeout (30 minutes by default): groups are made with this shorter one, and
# then given the default back for their collectives, in which a rank may wait long for a slow one.
GLOO_CONNECT_TIMEOUT = timedelta(minutes=3)


def _connect_gloo(make_group: Callable[[timedelta], dist.ProcessGroup | None]) -> dist.ProcessGroup | None:
    """make_group(timeout), a gloo group, connected within GLOO_CONNECT_TIMEOUT or stopped in one line."""
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # private; absent from older torch
    timeout = GLOO_CONNECT_TIMEOUT if set_timeout else default_pg_timeout
    try:
        group = make_group(timeout)
    except RuntimeError as e:  # torch's DistError and gloo's own failures alike
        interface = os.environ.get("GLOO_SOCKET_IFNAME") or "the address this machine's name resolves to"
        master = os.environ.get("MASTER_ADDR", "?")
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"the processes did not connect over gloo within {timeout.total_seconds():.0f} s "
                        f"({reason}); this process used {interface}. On several nodes set GLOO_SOCKET_IFNAME "
                        f"(and NCCL_SOCKET_IFNAME on GPUs) to the interface that reaches MASTER_ADDR {master} "
                        f"on every node (`ip route get {master}` names it), and let the nodes accept each "
                        "other's TCP connections") from e
    if set_timeout:
        set_timeout(default_pg_timeout, group)  # None: the default group, which init_process_group made
    return group


def _spans_nodes() -> bool:
    """Whether this torchrun job has processes on other machines (torchrun sets LOCAL_WORLD_SIZE and
    GROUP_WORLD_SIZE, the number of nodes)."""
    world = int(os.environ["WORLD_SIZE"])
    return (int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world
            or int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1)


def shutdown() -> None:
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device_sum_started(value: int, device: torch.device) -> tuple[torch.Tensor, Callable[[], object]]:
    """The sum of `value` over all processes, as a float64 tensor on `device`, and the call that waits for it:
    the sum is started now, and waited for by the device, not the host, on a GPU (NCCL queues it there), so
    the host goes on queuing work meanwhile. Read the tensor only after the wait."""
    total = torch.full((), value, dtype=torch.float64, device=device)  # no copy from the host: no sync
    if not dist.is_initialized():
        return total, lambda: None
    return total, dist.all_reduce(total, async_op=True).wait


def on_every_rank(work: Callable[[], T]) -> T:
    """`work()` on this process, then every process waits for the others: where it raised a UserError on any of
    them, every one stops, the others in one line naming it, rather than waiting for it in the next collective
    (30 minutes, then a traceback)."""
    try:
        result, failed = work(), None
    except UserError as e:
        result, failed = None, e
    if dist.is_initialized():
        stopped = [r for r, (flag,) in enumerate(host_all_gather([int(failed is not None)])) if flag]
        if stopped and failed is None:
            raise UserError(f"process {stopped[0]} stopped (its own line says why), so this one stops too")
    if failed is not None:
        raise failed
    return result


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
