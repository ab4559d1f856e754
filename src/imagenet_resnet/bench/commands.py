"""`imagenet-resnet bench ...`: the subcommands' options, and running the one asked for.

Only argparse here, so that `imagenet-resnet --help` does not import torch; each benchmark's module is
imported when it runs.
"""

from __future__ import annotations

import importlib

from ..config import MODEL_NAMES, PIPELINES
from ..option_types import decay, non_negative_float, non_negative_int, positive_float, positive_int, workers

PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
PRECISION_HELP = ("default auto, as train.precision: bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on a "
                  "CPU (where bf16 is several times slower)")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures and keep them as JSON", description=(
        "train: the training step on synthetic data; data: the loader; e2e: the training step fed from disk; "
        "infer: CPU latency, PyTorch vs onnxruntime; accuracy: a recipe's top-1 over seeds"))
    bench_sub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    _train(bench_sub)
    _data(bench_sub)
    _e2e(bench_sub)
    _infer(bench_sub)
    _accuracy(bench_sub)


def main(args) -> int:
    return importlib.import_module(f".{args.bench}", __package__).main(args)


def _recipe_options(p) -> None:
    """--recipe and --set of the benchmarks that time one training step."""
    p.add_argument("--recipe", help="time the step this YAML recipe trains (its model's variant and BlurPool, "
                   "optimizer, EMA, Mixup/CutMix); the options below override it where given")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value (repeatable)")


def _json(p) -> None:
    p.add_argument("--json", help="also write the record (command, machine, versions, figures) to this file")


def _train(bench_sub) -> None:
    t = bench_sub.add_parser("train", help="training-step throughput on synthetic data already on the device",
                             description="Times the training loop's step (with the EMA and Mixup/CutMix when asked) "
                             "after a warm-up: images/s, step time, peak memory and, on a GPU, the FLOP rate beside "
                             "its matrix rate measured at the same precision (on a CPU: \"peak unknown\", no rate).")
    _recipe_options(t)
    t.add_argument("--model", choices=MODEL_NAMES, help="default: the recipe's, else resnet50")
    t.add_argument("--res", type=positive_int, nargs="+",
                   help="input sides to time (default: the recipe's data.train_size, else 224)")
    t.add_argument("--batch-size", type=positive_int, nargs="+",
                   help="batch sizes to time (default: the recipe's train.batch_size, else 256)")
    t.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    t.add_argument("--compile", nargs="*", metavar="MODE",
                   help="torch.compile modes to try (default, max-autotune, max-autotune-no-cudagraphs, ...); "
                   "no mode named: default (not given: eager)")
    t.add_argument("--no-channels-last", action="store_true", help="NCHW instead of NHWC")
    t.add_argument("--fused", action="store_true", help="fused CUDA SGD kernel instead of the foreach one")
    t.add_argument("--ema-decay", type=decay, help="also update an EMA of the weights each step, as "
                   "train.ema_decay does (default: the recipe's, else 0: off)")
    t.add_argument("--mixup", type=non_negative_float,
                   help="Mixup alpha, as data.mixup_alpha (default: the recipe's, else 0: off)")
    t.add_argument("--cutmix", type=non_negative_float,
                   help="CutMix alpha, as data.cutmix_alpha (default: the recipe's, else 0: off)")
    t.add_argument("--steps", type=positive_int, default=50, help="timed steps (default 50)")
    t.add_argument("--warmup", type=non_negative_int, default=15, help="untimed steps first (default 15)")
    t.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda:N")
    _json(t)


def _data(bench_sub) -> None:
    d = bench_sub.add_parser("data", help="loader images/s per core: ours on the packed copy vs a torchvision-like "
                             "baseline", description="Both in one process, on the same images, with one torch "
                             "thread: a per-core figure; --workers adds the multi-process loader's total rate.")
    d.add_argument("--data", required=True, help="a folder made by `imagenet-resnet prepare ... --pack`")
    d.add_argument("--size", type=positive_int, default=224, help="training crop side (default 224)")
    d.add_argument("--images", type=positive_int, default=1000, help="distinct images to cycle through (default 1000)")
    d.add_argument("--seconds", type=positive_float, default=20.0, help="time per measurement (default 20)")
    d.add_argument("--workers", type=non_negative_int, default=0,
                   help="also measure the loader with N processes (default 0: not)")
    d.add_argument("--batch-size", type=positive_int, default=256,
                   help="batch size of the loader measurement (default 256)")
    _json(d)


def _e2e(bench_sub) -> None:
    e = bench_sub.add_parser("e2e", help="the training step fed by the real loader from disk, against synthetic data",
                             description="Reports images/s, the share of time spent waiting for the loader, and the "
                             "same step's rate on a batch kept on the device, timed half before and half after "
                             "the e2e run in the same process (e2e_over_synthetic; the target is >= 0.9).")
    e.add_argument("--data", required=True, help="a prepared folder (its packed copy is used when there is one)")
    _recipe_options(e)
    e.add_argument("--model", choices=MODEL_NAMES, help="default: the recipe's, else resnet50")
    e.add_argument("--res", type=positive_int, help="default: the recipe's data.train_size, else 224")
    e.add_argument("--batch-size", type=positive_int, help="default: the recipe's train.batch_size, else 256")
    e.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    e.add_argument("--compile", metavar="MODE", help="torch.compile mode (default, max-autotune, ...); eager when "
                   "not given")
    e.add_argument("--workers", type=workers, default=-1, help="loader processes (default: every core, at most 16)")
    e.add_argument("--steps", type=positive_int, default=100, help="timed steps (default 100)")
    e.add_argument("--warmup", type=non_negative_int, default=20, help="untimed steps first (default 20)")
    e.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda:N")
    e.add_argument("--no-channels-last", action="store_true", help="NCHW instead of NHWC")
    e.add_argument("--fused", action="store_true", help="fused CUDA SGD kernel")
    e.add_argument("--no-synthetic", action="store_true", help="skip the synthetic comparison run")
    _json(e)


def _infer(bench_sub) -> None:
    i = bench_sub.add_parser("infer", help="CPU inference latency p50/p99: PyTorch eager fp32 vs onnxruntime",
                             description="Both runtimes get the same normalised batch and the same threads; every "
                             "call is timed on its own, after the ONNX export's logits were checked against PyTorch's.")
    model = i.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="one of our checkpoints (.pt) or a .safetensors export")
    model.add_argument("--model", choices=MODEL_NAMES, help="an untrained model of this architecture "
                       "(1000 classes): the timing of a trained one, without needing one")
    i.add_argument("--size", type=positive_int, help="input side in px (default: the checkpoint's eval size, else 224)")
    i.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 32], help="default 1 32")
    i.add_argument("--iterations", type=positive_int, default=50,
                   help="timed calls per runtime and batch size (default 50)")
    i.add_argument("--warmup", type=non_negative_int, default=5, help="untimed calls first (default 5)")
    i.add_argument("--threads", type=positive_int,
                   help="intra-op threads for both runtimes (default: PyTorch's, one per core)")
    i.add_argument("--out", "--json", dest="json", metavar="JSON",
                   help="also write the record (command, CPU, threads, versions, figures) to this file")


def _accuracy(bench_sub) -> None:
    a = bench_sub.add_parser("accuracy", help="validation top-1 of a recipe over several seeds, as one JSON record",
                             description="One `imagenet-resnet train` process per seed, in RUNS/seed-N; finished runs "
                             "there are read again and unfinished ones resumed, so an interrupted benchmark picks up "
                             "where it stopped.")
    a.add_argument("--data", required=True, help="a prepared folder (its packed copy is used when it has one)")
    a.add_argument("--recipe", help="YAML recipe, e.g. recipes/imagenette_128_5ep.yaml (default: none, the defaults)")
    a.add_argument("--model", choices=MODEL_NAMES, help="override the recipe's model")
    a.add_argument("--epochs", type=positive_int, help="override the recipe's epochs")
    a.add_argument("--batch-size", type=positive_int, help="override the recipe's batch size")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value for every run (repeatable)")
    a.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2],
                   help="one training run per seed (default 0 1 2)")
    a.add_argument("--runs-dir", required=True, help="folder for the runs (RUNS/seed-N)")
    a.add_argument("--eval-pipelines", nargs="+", choices=PIPELINES, metavar="PIPELINE",
                   help=f"also evaluate each run's final weights through these pipelines ({', '.join(PIPELINES)}) "
                   "and count the images whose prediction differs from the first's (default: not)")
    a.add_argument("--dataset", help="the dataset's name in the record (default: the --data folder's name)")
    _json(a)
