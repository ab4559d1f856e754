"""The code paths only a GPU (or several) takes, tested on the CPU: each test here fails on the bug that was
found on that path (issue 20). tests/test_cuda.py runs the same paths on a real GPU where there is one."""

import json
import shutil

import pytest
import torch

from conftest import TINY_SETTINGS, train_tiny
from host_syncs import HostSyncs
from imagenet_resnet.config import load_config
from imagenet_resnet.data import loader
from imagenet_resnet.data.loader import EpochBatchSampler
from imagenet_resnet.data.prepared import open_splits
from imagenet_resnet.errors import UserError
from imagenet_resnet.models import build_model
from imagenet_resnet.runtime import DeviceNormalize, auto_precision, compile_model
from imagenet_resnet.training import checkpoint
from imagenet_resnet.training.augment import MixAugment
from imagenet_resnet.training.checkpoint import Checkpointer, TrainingState
from imagenet_resnet.training.run_folder import RunFolder
from imagenet_resnet.training.distributed import Dist
from imagenet_resnet.training.ema import ModelEma
from imagenet_resnet.training.lr_finder import sweep
from imagenet_resnet.training.schedules import LRSchedule
from imagenet_resnet.training.optim import build_optimizer, lr_for_batch, lr_per_256
from imagenet_resnet.training.stopping import StopPolicy
from imagenet_resnet.training.run import build_run
from imagenet_resnet.training.trainer import train_one_epoch

CPU = torch.device("cpu")


# --- resume: a checkpoint loads to the host, and load_state_dict places it ----------------------------------

@pytest.mark.filterwarnings("ignore:.*meta parameter")  # copying into a tensor without memory is a no-op
def test_resume_places_the_checkpoint_beside_the_runs_own_tensors(tmp_path, tiny_data):
    """Resuming into a run whose tensors live on another device than the checkpoint's (here the meta device, as
    a GPU run's live on cuda:N): every saved tensor is loaded to the host and copied into its place by
    load_state_dict. Loading straight onto the run's device put the saved RNG state there, and
    torch.set_rng_state raised on it: every resume on a GPU failed."""
    train_tiny(tiny_data, tmp_path / "run", "train.ema_decay=0.9", "train.log_every_steps=0", epochs=1)
    saved = checkpoint.load(tmp_path / "run" / "last.pt")
    cfg = load_config(None, [*TINY_SETTINGS, f"data.path={tiny_data}", "train.ema_decay=0.9"])
    model = build_model("resnet18", 10, width=8).to("meta")
    optimizer = build_optimizer(model, cfg, lr=0.1)
    state = TrainingState(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), ModelEma(model, 0.9))
    newest, fell_back = checkpoint.load_newest(tmp_path / "run")
    Checkpointer(RunFolder(tmp_path / "run"), True, cfg, saved["classes"]).resume(state, (newest, fell_back))
    assert newest["config"] == saved["config"] and fell_back is None
    assert state.progress.global_step == saved["progress"]["global_step"] and state.ema.updates == 7
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(s.device.type == "meta" for s in optimizer.state[next(model.parameters())].values())


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_machine_without_one(tmp_path):
    """A file whose tensors were saved from cuda:0 (its storages are tagged so) loads where there is no GPU."""
    tag_as_gpu = (-1, lambda storage: "cuda:0", lambda storage, location: None)  # asked before the CPU's tagger
    torch.serialization.register_package(*tag_as_gpu)
    try:
        path = tmp_path / "gpu.pt"
        torch.save({"model": {"w": torch.arange(4.0)}}, path)
    finally:
        torch.serialization._package_registry.remove(tag_as_gpu)
    assert b"cuda:0" in path.read_bytes()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # what a load without a map_location does here
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.arange(4.0))


# --- precision ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, expected", [((6, 1), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                                  ((8, 0), "bf16"), ((8, 6), "bf16"), ((8, 9), "bf16"),
                                                  ((9, 0), "bf16"), ((10, 0), "bf16")],
                         ids=["P100", "V100", "T4", "A100", "A10", "L4", "H100", "B200"])
def test_auto_precision_is_bf16_only_where_it_is_native(capability, expected):
    assert auto_precision("cuda", capability) == expected


def test_auto_precision_on_the_cpu_is_fp32():
    assert auto_precision("cpu") == "fp32"


# --- the LR: the finder's steps and the batch-size rule ---------------------------------------------------------

def test_the_lr_finder_sweeps_whole_accumulated_steps():
    """At the same global batch, 2 micro-batches of 8 sweep the same curve as one batch of 16: the LR found is
    the global batch's. The finder used to take one micro-batch per step, so with accumulation A it measured
    an A-times smaller batch and the run's LR came out A times too low."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 16, 12, 12, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (40, 16), generator=g)

    def curve(micro_batch: int):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(8, 5))
        optimizer = build_optimizer(model, load_config(None, ["optim.weight_decay=0"]), lr=0.1)
        batches = iter([(images[s, k:k + micro_batch], labels[s, k:k + micro_batch], [])
                        for s in range(40) for k in range(0, 16, micro_batch)])
        return sweep(model, optimizer, batches, DeviceNormalize(CPU, False), "fp32", 0.0, start_lr=1e-3,
                     end_lr=10.0, steps=40, accumulation_steps=16 // micro_batch)

    whole, accumulated = curve(16), curve(8)
    assert len(whole.lrs) == len(accumulated.lrs) >= 30
    assert whole.lrs == accumulated.lrs
    torch.testing.assert_close(torch.tensor(accumulated.losses), torch.tensor(whole.losses), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, rule", [("sgd", "linear"), ("adamw", "sqrt"), ("radam", "sqrt"), ("lamb", "sqrt")])
def test_lr_scales_with_the_global_batch_by_the_optimizers_rule(name, rule):
    optim = load_config(None, [f"optim.name={name}", "optim.lr=0.1"]).optim
    expected = 0.1 * (4 if rule == "linear" else 2)
    assert lr_for_batch(optim, 1024) == pytest.approx(expected)
    assert lr_per_256(expected, optim, 1024) == pytest.approx(0.1)
    optim.lr_scaling = "linear"
    assert lr_for_batch(optim, 1024) == pytest.approx(0.4)


# --- no host sync in the training loop --------------------------------------------------------------------------

def test_twenty_steps_with_ema_mixup_and_cutmix_wait_for_the_device_only_at_the_epochs_end(tiny_data, tmp_path):
    """20 steps of train_one_epoch with EMA, Mixup and CutMix: the only calls that make the host wait for the
    device is the one read of the epoch's sums at its end, whatever the number of steps. AveragedModel read
    its counter twice a step and copied it to the device, and the Mixup permutation was a blocking copy."""
    # The loader works in its own process (data.workers=1), as on a GPU machine: its host-side work is not counted.
    cfg = load_config(None, [*TINY_SETTINGS, f"data.path={tiny_data}", "data.workers=1", "train.batch_size=6",
                             "train.ema_decay=0.99", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
                             "optim.clip_grad_norm=1.0", "train.log_every_steps=0", "train.epochs=1"])
    run = build_run(cfg, Dist(), CPU)
    assert run.steps_per_epoch == 20
    schedule = LRSchedule(cfg.schedule, 0.1, 1, run.steps_per_epoch)
    checkpointer = Checkpointer(RunFolder(tmp_path), True, cfg, run.train_index.classes)
    reporter = _Silent()
    with HostSyncs() as syncs:
        train_one_epoch(run, 0, schedule, None, StopPolicy(run.world, CPU), reporter, checkpointer, print)
    assert run.progress.global_step == 20 and run.state.ema.updates == 20
    # DataLoader draws its workers' base seed as a host tensor once an epoch: no device is involved.
    waits = [where for _, where in syncs.calls if "torch/utils/data/" not in where]
    assert len(waits) == 1 and "fold_into" in waits[0], syncs.calls


class _Silent:
    """A StepReporter that shows nothing (rank 1's): the test counts the training loop's own waits."""

    def start_epoch(self, *args):
        pass

    def step(self, *args):
        pass

    def end_epoch(self):
        pass


def test_batches_reach_the_device_without_blocking_the_host():
    """DeviceNormalize, the one way batches and labels reach the device, asks every copy to be non-blocking
    (from the memory the loader pins on CUDA): a blocking copy there would stall the host once per micro-batch,
    and CUDA's sync check does not see copies to the GPU."""
    copies = []

    class Copies(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_):
                copies.append(bool(kwargs.get("non_blocking")))
            return func(*args, **kwargs)

    normalize = DeviceNormalize(CPU, channels_last=True)
    with Copies():
        normalize(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
        normalize.labels(torch.zeros(2, dtype=torch.int64))
    assert copies == [True, True]


def test_cutmix_gathers_the_box_not_the_batch():
    x = torch.randn(8, 3, 32, 32)
    shapes = []

    class Indexing(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.__getitem__ and isinstance(out, torch.Tensor) and out.ndim == 4:
                shapes.append(tuple(out.shape))
            return out

    with Indexing():
        _, _, lam = MixAugment(0.0, 1.0, seed=0)(x, torch.arange(8), step=3, micro=0)
    assert 0 < lam < 1 and shapes  # a box was cut (this seed and step)
    assert all(shape[2:] != (32, 32) for shape in shapes), shapes  # no whole-image gather


# --- a diverged run stops before saving ---------------------------------------------------------------------------

def test_a_nonfinite_loss_stops_the_run_before_any_checkpoint_holds_it(tiny_data, tmp_path):
    """With checkpoints every 2 steps, a loss that becomes NaN stops the run at the next checkpoint, unsaved,
    naming the step and the last good checkpoint. It was checked at the epoch's end only, so two periodic
    checkpoints after the divergence left last.pt and previous.pt both ruined."""
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"diverged: .* NaN or infinite at global step (\d+); stopped without saving: "
                                        r".*last\.pt \(global step (\d+)\) is the last good checkpoint") as stopped:
        train_tiny(tiny_data, out, "train.checkpoint_every_steps=2", "schedule.name=constant", "optim.lr=2e4",
                   "train.log_every_steps=0", epochs=2)
    bad_step = int(stopped.value.args[0].split("global step ")[1].split(";")[0])
    for name in ("last.pt", "previous.pt"):
        saved = checkpoint.load(out / name)
        assert saved["progress"]["global_step"] < bad_step
        assert all(torch.isfinite(w).all() for w in saved["model"].values() if w.is_floating_point()), name


# --- several processes: agreement on dropped micro-batches, counts after a resume ----------------------------------

def test_a_micro_batch_one_rank_cannot_train_on_never_stalls_the_other_and_counts_once(tiny_data, tmp_path):
    """Rank 1's first micro-batch holds one readable image (BatchNorm cannot train on it): rank 1 runs a
    zero-weighted stand-in in its place while rank 0 trains on its own (training/step.py), where rank 1 once
    dropped it alone and rank 0 waited for its gradients forever. Stopped after that step and resumed, the run
    counts the image once per epoch: the resumed ranks each took the saved count as their own, and the sum over
    ranks doubled it."""
    from test_distributed import _finish, _settings, _torchrun

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train_index, _ = open_splits(data)
    rank1 = EpochBatchSampler(len(train_index), 2, shuffle=True, drop_last=True, seed=0, rank=1, world_size=2)
    first_of_rank1 = next(iter(rank1))[0][1]
    (data / "train" / train_index.names[first_of_rank1].decode()).write_bytes(b"not a JPEG")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "2", "--resume",
            *_settings("train.batch_size=2", "train.log_every_steps=0")]
    _finish(_torchrun(*args, "--set", "train.stop_at_step=1"), timeout=180)
    _finish(_torchrun(*args), timeout=180)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in records] == [1, 2]  # cumulative: once in each epoch


# --- torch.compile: static shapes per resolution ------------------------------------------------------------------

def test_compile_keeps_a_static_graph_for_each_resolution():
    """Progressive resizing feeds the compiled model new resolutions: each gets a static graph of its own.
    Without dynamic=False torch.compile makes the graph dynamic at the second shape (the sizes become inputs
    of the graph), and the rest of the run goes through that slower graph."""
    size_inputs = []

    def backend(graph_module, example_inputs):
        size_inputs.append([x for x in example_inputs if not isinstance(x, torch.Tensor)])  # SymInts if dynamic
        return graph_module.forward

    torch._dynamo.reset()
    model = compile_model(build_model("resnet18", 10, width=8).eval(), "default", backend)
    with torch.no_grad():
        for side in (32, 64, 48, 32):
            model(torch.randn(2, 3, side, side))
    assert size_inputs == [[], [], []]  # one static graph per size, the first one reused


# --- loader workers per node ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cores, local_processes, expected", [(16, 1, (16, 8)), (64, 1, (16, 8)), (16, 8, (2, 1)),
                                                                (96, 8, (12, 6)), (4, 8, (1, 1))])
def test_loader_workers_share_the_nodes_cores_among_its_processes(monkeypatch, cores, local_processes, expected):
    """8 GPUs on a 16-core node: 2 + 1 workers per process, not 16 + 16 (256 processes)."""
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    assert loader.resolve_workers(-1) == expected
    assert loader.resolve_workers(3) == (3, 3)  # as configured

