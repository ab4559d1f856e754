"""`imagenet-resnet bench accuracy`: a recipe's validation top-1 over several seeds, as one JSON record.

Each seed is its own `imagenet-resnet train` process, exactly what a user would run, in RUNS/seed-N. A seed
whose run folder already holds the finished run is read, not trained again, and an unfinished one is
resumed: an interrupted benchmark picks up where it stopped.

`--eval-pipelines` also checks the evaluation path on its own: each run's final weights are evaluated
through every pipeline named (fast, full-decode, reference), and the record says how many images'
predictions differ from the first pipeline's.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import Config, changed_settings, load_config
from ..data.loader import EpochBatchSampler, ImageDataset, build_loader
from ..data.prepared import open_split
from ..data.presets import make_eval_preset, pipeline_description
from ..errors import UserError
from ..runtime import autocast
from ..serving.inference import LoadedModel, load_model
from ..training.monitor import read_records
from .record import write_record


def _finished_metrics(run_dir: Path, epochs: int) -> list[dict] | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = read_records(metrics)
    return records if records and records[-1]["epoch"] == epochs else None


@torch.no_grad()
def predictions(loaded: LoadedModel, data: str, pipeline: str, batch_size: int = 128, workers: int = -1) -> np.ndarray:
    """The predicted label of every val image, in index order, through one eval pipeline (-1: unreadable);
    from the packed copy or the original files, as the run itself read them."""
    index = open_split(data, "val", loaded.cfg.data.packed, classes=loaded.classes)
    preset = make_eval_preset(pipeline, loaded.cfg.data.eval_size, loaded.cfg.data.eval_crop_ratio)
    dataset = _KeepOrder(index, preset)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False, drop_last=False)
    loader = build_loader(dataset, sampler, workers, loaded.device.type == "cuda")
    predicted = np.full(len(dataset), -1, dtype=np.int64)
    for images, positions, _ in loader:
        if len(positions):
            with autocast(loaded.precision, loaded.device):
                logits = loaded.model(loaded.normalize(images))
            predicted[positions.numpy()] = logits.argmax(1).cpu().numpy()
    return predicted


class _KeepOrder(ImageDataset):
    """The val set, with each image's position in place of its label, so predictions land where they belong
    even when unreadable images are left out of a batch."""

    def __getitem__(self, key):
        pixels, _, problem = super().__getitem__(key)
        return pixels, key[1], problem


def eval_agreement(checkpoint: Path, data: str, pipelines: list[str], device: str = "auto") -> dict:
    """Top-1 of one checkpoint through each eval pipeline, and the images whose prediction differs from
    the first pipeline's."""
    loaded = load_model(checkpoint, device)
    labels = open_split(data, "val", loaded.cfg.data.packed, classes=loaded.classes).labels
    predicted = {p: predictions(loaded, data, p) for p in pipelines}
    first = predicted[pipelines[0]]
    return {
        "top1": {p: float(np.mean(pred == labels)) for p, pred in predicted.items()},
        "images": int(len(labels)),
        "differing_predictions": {p: int(np.sum(pred != first)) for p, pred in predicted.items() if p != pipelines[0]},
    }


def _summary(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def _check_same_settings(run_dir: Path, expected: dict) -> None:
    """A run folder reused by a second invocation must hold a run of the same settings."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text())
    found_lr = expected["optim"]["find_lr"]  # the saved config holds the LR the finder chose
    # A key the saved config lacks is a setting newer than the run; its default is what the run had.
    comparable = {section: {key: value for key, value in values.items() if key in saved.get(section, {})
                            and not (found_lr and (section, key) == ("optim", "lr"))}
                  for section, values in expected.items()}
    changed = changed_settings(saved, comparable)
    if changed:
        raise UserError(f"{run_dir} holds a run with other settings ({', '.join(changed)}); "
                         "give another --runs-dir, or delete that folder")


def train_seed(train_args: list[str], run_dir: Path, seed: int, cfg: Config) -> dict:
    """Train (or resume, or just read) one seed's run; its figures from metrics.jsonl."""
    expected = cfg.to_dict()
    expected["train"]["seed"] = seed
    _check_same_settings(run_dir, expected)
    epochs = cfg.train.epochs
    records = _finished_metrics(run_dir, epochs)
    seconds = None
    if records is None:
        command = [sys.executable, "-m", "imagenet_resnet", "train", *train_args, "--out", str(run_dir),
                   "--set", f"train.seed={seed}"] + (["--resume"] if run_dir.exists() else [])  # a used --out needs it
        print(f"seed {seed}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        # The trainer's log goes to stderr, so that stdout carries only this benchmark's JSON record.
        done = subprocess.run(command, stdout=sys.stderr)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise UserError(f"seed {seed}: training exited with {done.returncode}; its log is in {run_dir}/train.log")
        records = _finished_metrics(run_dir, epochs)
        if records is None:
            raise UserError(f"seed {seed}: {run_dir}/metrics.jsonl does not reach epoch {epochs}")
    else:
        print(f"seed {seed}: {run_dir} already holds the finished run; reading it", file=sys.stderr, flush=True)
    last = records[-1]
    run = {"seed": seed, "val_top1": last["val_top1"], "val_top5": last["val_top5"],
           "seconds": round(seconds, 1) if seconds is not None else None,
           "train_seconds": round(sum(r["epoch_seconds"] for r in records), 1),
           "top1_per_epoch": [r["val_top1"] for r in records], "run": str(run_dir)}
    if "val_top1_ema" in last:
        run["val_top1_ema"] = last["val_top1_ema"]
    return run


def bench_accuracy(args) -> dict:
    flags = [("--recipe", args.recipe), ("--model", args.model), ("--epochs", args.epochs),
             ("--batch-size", args.batch_size)]
    train_args = ["--data", args.data] + [str(x) for flag, value in flags if value is not None for x in (flag, value)]
    for setting in args.overrides:
        train_args += ["--set", setting]
    cfg = load_config(args.recipe, [f"data.path={args.data}"] + [f"{key}={value}" for key, value in (
        ("model.name", args.model), ("train.epochs", args.epochs), ("train.batch_size", args.batch_size))
        if value is not None] + args.overrides)
    runs_dir = Path(args.runs_dir)
    runs = []
    for seed in args.seeds:
        run = train_seed(train_args, runs_dir / f"seed-{seed}", seed, cfg)
        if args.eval_pipelines:
            run["eval_check"] = eval_agreement(runs_dir / f"seed-{seed}" / "last.pt", args.data, args.eval_pipelines)
        runs.append(run)
        print(f"seed {seed}: val top-1 {run['val_top1']:.4f}", file=sys.stderr, flush=True)
    m = cfg.model
    top1 = _summary([r["val_top1"] for r in runs])
    record = {
        "benchmark": "accuracy", "dataset": args.dataset or Path(args.data).name, "data": args.data,
        "model": m.describe(),
        "res": cfg.data.train_size, "eval_res": cfg.data.eval_size, "eval_flip": cfg.data.eval_flip,
        "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size * cfg.train.accumulation_steps,
        "recipe": args.recipe, "overrides": args.overrides, "pipeline": pipeline_description(cfg.data.pipeline),
        "runs": runs, "val_top1_mean": top1["mean"], "val_top1_std": top1["std"], "val_top1_min": top1["min"],
        "val_top1_max": top1["max"], "config": cfg.to_dict(),  # resolved; each run's train.seed is its own
    }
    if args.eval_pipelines:
        record["eval_pipelines"] = [pipeline_description(p) for p in args.eval_pipelines]
    return record


def main(args) -> int:
    write_record(bench_accuracy(args), args.json)
    return 0
