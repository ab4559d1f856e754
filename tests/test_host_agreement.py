"""The training step under torchrun (2 real processes, gloo): a step whose micro-batches are all full makes no
host round trip, and a step where one process has a micro-batch with 0 or 1 readable images goes on and
trains on what the same global batch trains in one process.

The processes run this file as a script (at the bottom); the tests compare what rank 0 saved with the same
steps taken in the test's own process, as one process with accumulation.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import free_port
from host_syncs import HostSyncs
from imagenet_resnet.models import build_model
from imagenet_resnet.runtime import DeviceNormalize
from imagenet_resnet.training import distributed
from imagenet_resnet.training.step import train_step

BATCH = 4
# Per step, the readable images of (rank 0's, rank 1's) micro-batch of BATCH.
SCENARIOS = {
    "full": [(4, 4), (4, 4), (4, 4)],
    "rank 1 empty": [(4, 0), (4, 4)],
    "rank 0 with one": [(1, 4), (4, 4)],
    "rank 1 with one": [(4, 1), (4, 4)],
    "nothing trainable": [(1, 0), (4, 4)],
}
NORMALIZE = DeviceNormalize(torch.device("cpu"), channels_last=False)
COLLECTIVES = ("all_gather", "all_gather_object", "all_gather_into_tensor", "all_reduce", "broadcast",
               "broadcast_object_list", "barrier", "gather", "scatter", "reduce", "reduce_scatter", "all_to_all")


def micro_batch(scenario: str, step: int, chunk: int):
    """Global chunk `chunk` of the step (rank `chunk`'s micro-batch on 2 processes): the readable images of its
    BATCH, and a reason for each unreadable one, as the loader gives them."""
    g = torch.Generator().manual_seed(1000 * step + chunk)
    images = torch.randint(0, 256, (BATCH, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (BATCH,), generator=g)
    readable = SCENARIOS[scenario][step][chunk]
    return images[:readable], labels[:readable], [f"{i}.jpg: not a JPEG" for i in range(BATCH - readable)]


def fresh_model():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5, width=8)
    # Momentum and weight decay: a step taken on zero gradients would still move the weights.
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)


def take_steps(scenario: str, runner, optimizer, chunks) -> None:
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(len(SCENARIOS[scenario])):
        train_step(runner, optimizer, scaler, [micro_batch(scenario, step, c) for c in chunks], NORMALIZE, "fp32",
                   step=step)


class CountedCollectives:
    """Records each torch.distributed collective called while active: its name, whether it went to the run's
    own group or a side group (the host's gloo group), and whether the caller waits for it on the spot."""

    def __enter__(self):
        self.calls, self.originals = [], {name: getattr(dist, name) for name in COLLECTIVES}
        for name, original in self.originals.items():
            setattr(dist, name, self._counting(name, original))
        return self

    def _counting(self, name, original):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            self.calls.append({"name": name, "group": "run" if group in (None, dist.GroupMember.WORLD) else "side",
                               "waits": not kwargs.get("async_op", False)})
            return original(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    info, _ = distributed.init("cpu")
    report = {}
    for scenario in SCENARIOS:
        model, optimizer = fresh_model()
        runner = torch.nn.parallel.DistributedDataParallel(model)
        with CountedCollectives() as collectives, HostSyncs() as syncs:
            take_steps(scenario, runner, optimizer, chunks=[info.rank])
        report[scenario] = {"collectives": collectives.calls, "host_syncs": syncs.calls}
        if info.is_main:
            torch.save(model.state_dict(), out / f"{scenario}.pt")
    if info.is_main:
        (out / "report.json").write_text(json.dumps(report))
    distributed.shutdown()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The scenarios' steps on 2 processes; a rank that waited forever for the other's gradients ends it here."""
    out = tmp_path_factory.mktemp("host-agreement")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             f"--master-port={free_port()}", __file__, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: nothing left hanging
        raise
    assert proc.returncode == 0, output[-4000:]
    return out, json.loads((out / "report.json").read_text())


def one_process(scenario: str) -> dict:
    """The same steps in this process, as one process with 2 micro-batches (global chunks 0 and 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a CPU kernel's sums run in an order that depends on its threads
    try:
        model, optimizer = fresh_model()
        take_steps(scenario, model, optimizer, chunks=[0, 1])
    finally:
        torch.set_num_threads(threads)
    return model.state_dict()


def test_a_step_with_every_micro_batch_full_makes_no_host_round_trip(two_processes):
    """Each step exchanged the micro-batch sizes over a gloo group on the host and waited for them (all
    processes in lockstep before any work was queued); now the one collective a common step calls is the image
    count's sum, started without waiting, on the run's own group (NCCL on GPUs: queued on the device)."""
    _, report = two_processes
    calls = report["full"]["collectives"]
    assert calls == [{"name": "all_reduce", "group": "run", "waits": False}] * len(SCENARIOS["full"]), calls
    assert report["full"]["host_syncs"] == []  # the count is never read on the host


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "full"])
def test_a_rank_with_0_or_1_readable_images_trains_on_as_one_process_would(two_processes, scenario):
    """The run goes on (no rank waits for another's gradients), and the weights, BatchNorm's statistics
    included, equal bitwise those of one process taking the same global batches with accumulation: the
    micro-batches with 2 or more readable images trained, each weighted by its share of them, the others not."""
    out, _ = two_processes
    saved = torch.load(out / f"{scenario}.pt")
    expected = one_process(scenario)
    assert saved.keys() == expected.keys()
    differ = [k for k in saved if not torch.equal(saved[k], expected[k])]
    assert not differ, f"{scenario}: {differ[:5]}"
    start, _ = fresh_model()
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in expected.items())  # it did train


def test_a_step_with_nothing_trainable_leaves_the_weights_and_momentum_alone():
    model, optimizer = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, images = train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                              [micro_batch("nothing trainable", 0, c) for c in (0, 1)], NORMALIZE, "fp32")
    assert images == 0 and loss.item() == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state  # no momentum buffer: the optimizer never stepped


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
