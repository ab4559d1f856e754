"""The `imagenet-resnet` command: prepare, train, find-lr, recipes, demo, evaluate, report, status, predict,
explain, serve, export, bench (`--help` lists them from the parser itself). Each subcommand's parser names the
function that carries it out (`set_defaults(func=...)`); the demo's settings are the shipped recipes/demo.yaml.

Nothing heavy is imported before a subcommand runs (torch alone takes seconds): `--help` answers at once, and
each command imports what it needs when it starts.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from . import __version__
from .bench import commands as bench_commands
from .config import MODEL_NAMES, PIPELINES, RECIPES_DIR, Config, load_config
from .errors import UserError, check_writable, printable
from .option_types import int_in, non_negative_float, non_negative_int, port, positive_float, positive_int, workers
from .storage.urls import is_url, redact

DEMO_DATA_DEFAULT = Path.home() / ".cache" / "imagenet-resnet" / "shapes"

# The demo's settings, by the shipped file's path: a file named "demo" in the working folder is not it.
DEMO_RECIPE = RECIPES_DIR / "demo.yaml"


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one worth saying (not None, off or empty)."""

    def _get_help_string(self, action) -> str:
        text, default = action.help or "", action.default
        if not (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or "default" in text):
            text += " (default: %(default)s)"
        return text


def _command(sub, name: str, run, help: str, description: str) -> argparse.ArgumentParser:
    """Subcommand `name`, which `run(args)` carries out."""
    p = sub.add_parser(name, help=help, description=description, formatter_class=_HelpWithDefaults)
    p.set_defaults(func=run)
    return p


def _train_parser(sub, name: str, run, help: str, description: str) -> argparse.ArgumentParser:
    p = _command(sub, name, run, help, description)
    p.add_argument("--data", help="a prepared folder, or one with train/<class>/ and val/<class>/ "
                   "(default: the built-in shapes dataset)")
    if name == "train":
        p.add_argument("--out", help="run folder (default: runs/<date-time>)")
    p.add_argument("--recipe", help="a shipped recipe's name (`imagenet-resnet recipes` lists them) or a YAML file "
                   "(default: the config's defaults, or the demo's settings when --data is not given either)")
    p.add_argument("--model", choices=MODEL_NAMES, help="override the recipe's model")
    p.add_argument("--epochs", type=positive_int, help="override the recipe's epochs")
    p.add_argument("--batch-size", type=positive_int,
                   help="images per process per forward pass (override the recipe's)")
    if name == "train":
        p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt if there is one (with "
                       "--mirror: from the mirror's checkpoint when it is newer, or RUN is missing)")
        p.add_argument("--mirror", metavar="URL", help="also upload the run folder there as it is written, in the "
                       "background (s3://bucket/prefix or any fsspec URL; credentials from AWS_* variables or "
                       'profiles; pip install "imagenet-resnet[cloud]")')
        p.add_argument("--mirror-wait", type=non_negative_float, default=300.0, metavar="SECONDS",
                       help="at the end (or on SIGTERM), wait at most this long for the uploads to finish")
        p.add_argument("--track", action="append", metavar="mlflow[:URI]|wandb[:PROJECT]", type=_track_spec,
                       help="also send the run to an experiment tracker, from a background thread (repeatable): "
                       "config, step and epoch metrics, the report and best.pt at the end; --resume continues the "
                       "same tracker run; credentials the tracker's own ways (MLFLOW_TRACKING_*, WANDB_API_KEY); "
                       'pip install "imagenet-resnet[mlflow]" or "[wandb]"')
        p.add_argument("--take-over", action="store_true", help="take the mirror's lease from a trainer whose lease "
                       "is still live (one you know is gone); that trainer, should it come back, stops writing. Never "
                       "a run folder's lock: only a live trainer holds one")
        p.add_argument("--lease-timeout", type=positive_float, default=120.0, metavar="SECONDS",
                       help="a mirror's lease without a heartbeat for this long is stale, and --resume takes it "
                       "over (renewed every quarter of it)")
        p.add_argument("--no-lease", action="store_true", help="mirror without taking the mirror's lease, for a store "
                       "that does not honour conditional writes (the mirror refuses one at its start): then nothing "
                       "stops two trainers writing one mirror, nor a zombie instance that comes back")
        p.add_argument("--spot-notice", choices=("aws", "gcp"), help="poll the instance metadata service for a spot "
                       "preemption notice (AWS: 2 minutes' warning, GCP: 30 s); on one, checkpoint, finish the "
                       "mirror's uploads and exit 0; --resume continues")
        p.add_argument("--data-cache", metavar="DIR", help="with --data s3://... (a folder `prepare --out URL --pack` "
                       "wrote): where its local copy is kept, fetched once and checked (default: "
                       "~/.cache/imagenet-resnet/data)")
        p.add_argument("--budget", metavar="TIME|MONEY", help="fit the whole run to this much wall time (6h, "
                       "2h30m, 90m, 600s) or money (25usd, with --price-per-hour), start-up, evaluations and "
                       "checkpoints included: the recipe's epochs stretched or shrunk to spend all of it, ending "
                       "with the LR annealed; replaces --epochs; a resumed run gets what is left")
        p.add_argument("--price-per-hour", type=positive_float, metavar="USD",
                       help="what the run's machines cost per hour, all together, with --budget: for a budget in "
                       "usd, and to say a time budget's cost")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan (model, "
                       "device, precision, global batch, steps) and what a step needs in memory, and exit without "
                       "training or writing anything; --out is checked and a --resume planned as train would; with "
                       "--budget, measure a few steps at each of the recipe's resolutions and print the epochs that "
                       "fit")
        p.add_argument("--init-from", help="start from these weights (torchvision/timm ResNet state dict or one of "
                       "our checkpoints); a head for another number of classes is replaced")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set optim.lr=0.2 (repeatable)")
    return p


def _inference_options(p, checkpoint_help: str = "one of our checkpoints (.pt) or a .safetensors export") -> None:
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda:N")
    _ema_option(p)


def _ema_option(p) -> None:
    p.add_argument("--ema", action="store_true", help="use the exponential moving average of the weights "
                   "(train.ema_decay) instead of the raw weights")


def _add_training_commands(sub) -> None:
    _train_parser(sub, "train", cmd_train,
                  "train a ResNet", "Train, evaluate every epoch and checkpoint into the run folder "
                  "(config.yaml, metrics.jsonl, train.log, last.pt, best.pt). The same command runs under torchrun.")
    p = _train_parser(sub, "find-lr", cmd_find_lr,
                      "LR range test: sweep the LR, plot loss against it, suggest a peak LR",
                      "Trains copies of the model and optimizer while the LR grows exponentially, and suggests "
                      "--set optim.lr=... (per 256 images): a decade below the LR of the lowest smoothed loss.")
    p.add_argument("--plot", default="lr_find.png", help="where to write the plot (and its numbers as .json)")
    p.add_argument("--start-lr", type=positive_float, default=1e-5, help="the sweep's first LR")
    p.add_argument("--end-lr", type=positive_float, default=10.0, help="the sweep's last LR")
    p.add_argument("--steps", type=positive_int, default=200,
                   help="steps of the sweep (it stops early once the loss explodes)")
    _command(sub, "recipes", cmd_recipes,
             "list the shipped recipes", "Each recipe's model, epochs, batch size and what it "
             "follows, and its top-1: as published (with the source's address) and as measured by us (with the "
             "record in benchmarks/results), or that there is none; pass its name to --recipe.")
    p = _command(sub, "demo", cmd_demo, "generate a small shapes dataset, train a small ResNet on CPU, evaluate",
                 "A first run in about a minute and a quarter on two CPU cores (96% val top-1), with no data to "
                 "download.")
    p.add_argument("--out", default="demo-run", help="run folder")
    p.add_argument("--data", default=str(DEMO_DATA_DEFAULT), help="where to write the dataset")


def _add_data_commands(sub) -> None:
    p = _command(sub, "prepare", cmd_prepare, "check an ImageNet source and index it; --pack writes a fast packed copy",
                 "Recognises the official ILSVRC2012 tars + devkit, Kaggle's layout, Hugging Face parquet shards, "
                 "Tiny-ImageNet, ImageNet-V2 (its .tar.gz or folders 0..999, for evaluation) and class-folder trees; "
                 "checks every image; writes an index (and a packed copy). "
                 "All or nothing: the new files replace the old ones in --out only once all are complete.")
    p.add_argument("source", nargs="?", help="ILSVRC2012 tars + devkit, Kaggle layout, HF parquet shards, "
                   "tiny-imagenet-200, ImageNet-V2, or train/<class>/ + val/<class>/")
    p.add_argument("--out", help="the prepared folder to write (train with --data OUT); or a URL (s3://bucket/prefix, "
                   "any fsspec URL; with --pack): packed in --work-dir, each shard uploaded once written, "
                   "prepared.json last")
    p.add_argument("--work-dir", metavar="DIR", help="with --out URL: the local folder to pack in, a complete "
                   "prepared folder afterwards; a rerun resumes there (default: ~/.cache/imagenet-resnet/prepare/"
                   "<hash of the URL>)")
    p.add_argument("--pack", action="store_true", help="also write a packed copy (JPEG shards with an offset index)")
    p.add_argument("--short-side", type=non_negative_int, default=256,
                   help="packed images' short side cap in px (0: keep; 256 suits the resize-256-crop-224 eval)")
    p.add_argument("--quality", type=int_in(1, 100), default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--shard-images", type=positive_int, default=4096, help="images per packed shard file")
    p.add_argument("--limit-per-class", type=non_negative_int, default=0, metavar="N",
                   help="only the first N images of each class, in train and in val alike: a quick subset (0: all)")
    p.add_argument("--val-only", action="store_true", help="the validation split alone (for `evaluate`), even where "
                   "the source has training images too")
    p.add_argument("--workers", type=workers, default=-1, help="processes (-1: one per core)")
    p.add_argument("--verify", metavar="DATA", help="re-check a prepared folder instead")


def _add_model_commands(sub) -> None:
    p = _command(sub, "evaluate", cmd_evaluate,
                 "top-1/top-5, ReaL, calibration and the most confused classes, beside the "
                 "published ResNet-50 figures",
                 "Evaluates a checkpoint on the validation split of a prepared folder or class-folder tree (or an "
                 "ImageNet-V2 copy); data with a subset of the model's classes is evaluated on those classes. "
                 "ImageNet-1k validation files also get ReaL accuracy; ImageNet-1k data gets the published "
                 "figures beside ours. Accuracy per class is written only with --per-class-csv. A checkpoint in a "
                 "run folder keeps the figures in RUN/evaluations/, where `report RUN` shows them. See "
                 "docs/evaluation.md.")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    _inference_options(p)
    p.add_argument("--data", required=True, help="a prepared folder, or one with val/<class>/")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass")
    p.add_argument("--workers", type=workers, default=-1, help="loader processes (-1: one per core, at most 16)")
    p.add_argument("--size", type=positive_int, help="evaluation resolution (default: the run's data.eval_size)")
    p.add_argument("--flip", action="store_true", help="average each image's logits with its mirror image's")
    p.add_argument("--pipeline", choices=PIPELINES, help="how images are decoded and resized (default: the run's "
                   "data.pipeline); `reference` is torchvision's Resize + CenterCrop, to check the fast path")
    p.add_argument("--per-class-csv", help="also write accuracy per class (with names) to this CSV")
    p.add_argument("--plots", metavar="DIR", help="also draw a reliability diagram and a per-class accuracy chart "
                   "(PNG) into this folder")
    p.add_argument("--real", action="store_true", help="require ReaL accuracy: stop with the reason where the data "
                   "has none (without it, ReaL is reported wherever it can be)")

    p = _command(sub, "report", cmd_report, "plots (loss, accuracy, LR, speed) and training_log.md for a run folder",
                 "Reads metrics.jsonl and steps.jsonl (and the figures `evaluate` kept in RUN/evaluations/, shown "
                 "beside the published ones): works on a finished, running or resumed run, and on "
                 "the bucket a run is mirrored to (train --mirror URL) from any machine.")
    p.add_argument("run", metavar="RUN|URL", help="the run folder (finished, still going, or resumed), or the "
                   "URL it is mirrored to (s3://bucket/run, any fsspec URL)")
    p.add_argument("--out", help="folder for the plots and training_log.md (default: the plots in RUN/report and the "
                   "log in RUN; for a URL, both in ./report-<its last part>)")

    p = _command(sub, "status", cmd_status,
                 "one line: epoch, step, last val top-1, images/s, ETA, age of the last record",
                 "Where a run stands, from its run folder or the bucket it is mirrored to (train --mirror URL): "
                 "reads config.yaml, metrics.jsonl and the ends of steps.jsonl and train.log, never a "
                 "checkpoint. A run that stopped writing shows as stale. A folder of runs: a line for each.")
    p.add_argument("run", metavar="RUN|URL", help="the run folder, or the URL it is mirrored to (s3://bucket/run); "
                   "or a folder holding runs")
    p.add_argument("--json", action="store_true", help="the same as JSON (times in Unix seconds); a list for runs")

    p = _command(sub, "predict", cmd_predict, "top-k classes with names and probabilities for images",
                 "Images are read as the server reads uploads: any format and mode, 16-bit, alpha, EXIF rotation.")
    _inference_options(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files, or folders of them")
    p.add_argument("--top-k", type=positive_int, default=5, help="classes per image")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")

    p = _command(sub, "explain", cmd_explain,
                 "Grad-CAM: a gallery of misclassified validation images, or of given images",
                 "With --data: the most confident mistakes, each with Grad-CAM for the predicted and the true class.")
    _inference_options(p)
    p.add_argument("inputs", nargs="*", metavar="IMAGE|DIR", help="images to explain (else --data)")
    p.add_argument("--data", help="a prepared folder or class-folder tree: its misclassified val images")
    p.add_argument("--num-show", type=positive_int, default=20, help="mistakes in the gallery")
    p.add_argument("--layer", help="module to explain at (default: the deepest stage still at least 7 x 7: layer4 at "
                   "224 px, layer2 for the demo's 56 px)")
    p.add_argument("--out", default="gradcam.png", help="the gallery PNG to write")


def _add_shipping_commands(sub) -> None:
    p = _command(sub, "serve", cmd_serve,
                 "a web page (and JSON endpoint) that classifies uploaded images, with Grad-CAM",
                 "Gradio page at /, POST /api/classify for programs; bounded uploads and a bounded queue "
                 '(pip install "imagenet-resnet[serve]").')
    _inference_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only; "
                   "0.0.0.0 for every interface)")
    p.add_argument("--port", type=port, default=7860, help="port to listen on")
    p.add_argument("--examples", nargs="+", metavar="IMAGE|DIR",
                   help="example images to offer (default: one per class from the model's validation data, if here)")
    p.add_argument("--concurrency", type=positive_int, default=2, help="requests the model works on at once")
    p.add_argument("--max-queue", type=positive_int, default=32,
                   help="requests that may wait; more are told the server is busy")
    p.add_argument("--layer", help="module for Grad-CAM (default: the deepest stage still at least 7 x 7: layer4 at "
                   "224 px)")

    p = _command(sub, "export", cmd_export,
                 "safetensors + JSON sidecar, ONNX, TorchScript, or a Hugging Face Space folder (Gradio, or "
                 "static: the model runs in the visitor's browser)",
                 "Each export is read back and its logits compared with PyTorch's before it counts as written; "
                 'prints a JSON summary (pip install "imagenet-resnet[export]").')
    p.add_argument("--checkpoint", required=True, help="one of our checkpoints (.pt) or a .safetensors export")
    _ema_option(p)
    p.add_argument("--format", required=True, choices=["safetensors", "onnx", "torchscript", "space", "static-space"],
                   help="what to write")
    p.add_argument("--out", required=True, help="the file to write (the format sets its suffix; the JSON sidecar "
                   "goes beside it), or for space and static-space the folder")
    p.add_argument("--check-images", nargs="+", metavar="IMAGE|DIR", help="images to compare the export's logits "
                   "with PyTorch's on (default: a few synthetic ones); for space and static-space, the example images")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16",
                   help="static-space: how model.onnx stores its weights (computed in fp32 either way); ResNet-50: "
                   "a model.onnx of 102, 51 or 26 MB, measured (docs/serving.md)")
    p.add_argument("--opset", type=positive_int, help="ONNX opset (default: the one the export is tested with)")
    p.add_argument("--hardware", choices=["zero-gpu", "cpu"], default="zero-gpu",
                   help="space: the hardware it is made for: zero-gpu (ZeroGPU, which a free account may host a "
                   "Gradio Space on) or cpu (CPU basic, a paid account's, with PyTorch's CPU-only build)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagenet-resnet")
    parser.add_argument("--version", action="version", version=f"imagenet-resnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(sub)
    _add_training_commands(sub)
    _add_model_commands(sub)
    _add_shipping_commands(sub)
    bench_commands.add_parser(sub)
    sub.choices["bench"].set_defaults(func=bench_commands.main)
    parser.description = f"The `imagenet-resnet` command: {', '.join(sub.choices)}."  # every one, from the parser
    return parser


def _config_for_train(args) -> Config:
    demo = not args.recipe and (not args.data or getattr(args, "shapes", False))
    overrides = [f"data.path={args.data}"] if args.data else []
    if getattr(args, "budget", None):
        if args.epochs is not None:
            raise UserError(f"--budget {args.budget} fits the recipe's epochs to the budget: drop --epochs {args.epochs}")
        overrides.append(f"train.budget={json.dumps(args.budget)}")
    if getattr(args, "price_per_hour", None) is not None:
        if not getattr(args, "budget", None):  # nothing else reads it: taken silently, it would look used
            raise UserError(f"--price-per-hour {args.price_per_hour:g} is used with --budget only (a budget in usd, "
                            "or a time budget said with its cost): add --budget, e.g. --budget 25usd, or drop it")
        overrides.append(f"train.price_per_hour={args.price_per_hour}")
    for flag, key in (("model", "model.name"), ("epochs", "train.epochs"), ("batch_size", "train.batch_size"),
                      ("init_from", "train.init_from"), ("spot_notice", "train.spot_notice")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return load_config(DEMO_RECIPE if demo else args.recipe, overrides + args.overrides)


def _track_spec(spec: str):
    from .training.tracking import parse_track

    try:
        return parse_track(spec)
    except UserError as e:  # argparse says "argument --track:" itself: the message's own "--track ...: " goes
        message = str(e)
        raise argparse.ArgumentTypeError(message.split(": ", 1)[1] if message.startswith("--track ") else message) \
            from None


def cmd_train(args) -> int:
    from .data.synthetic import make_shapes_dataset
    from .training import distributed
    from .training.run_folder import RunFolder
    from .training.stopping import RunStopped
    from .training.tracking import TrackRequest, check_tracking
    from .training.trainer import dry_run, train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (args.data and (args.out or args.dry_run)):
        raise UserError("under torchrun give --data and --out, so that every process uses the same folders")
    if is_url(args.out or ""):
        raise UserError(f"--out {args.out}: the run folder is on this machine; to keep it in object storage too, "
                        "add --mirror URL")
    if args.resume and not args.out:  # else a new, timestamped folder: a new run, not the one meant
        raise UserError("--resume continues the run in its run folder: give that folder as --out")
    if args.no_lease and args.take_over:
        raise UserError("--take-over takes a mirror's lease, and --no-lease takes none: give one of them")
    # The run folder as train will check it, before any data is made or fetched (the default runs/<date-time>
    # goes in ./runs); neither check writes anything, so a dry-run makes them too.
    check_writable(Path(args.out or "runs"), "--out")
    if args.out and not args.resume:
        RunFolder(Path(args.out)).check_new()
    if not args.dry_run:
        check_tracking(TrackRequest(args.track) if args.track else None)
    if not args.data:
        args.data, args.shapes = str(make_shapes_dataset(DEMO_DATA_DEFAULT)), True
        print(f"no --data given: training on the built-in shapes dataset in {args.data}"
              + ("" if args.recipe else " with the demo's settings"), flush=True)
    elif is_url(args.data):  # before torchrun's group forms: a long fetch would time out its collectives
        from .data.cache import fetch_prepared

        args.data = str(fetch_prepared(args.data, args.data_cache))
    cfg = _config_for_train(args)
    if args.dry_run:
        if args.mirror:
            print(f"note: --dry-run plans from --out as it is here; it does not read --mirror {args.mirror} (a resume "
                  "continues from the mirror's checkpoint where that is newer)", flush=True)
        dry_run(cfg, Path(args.out) if args.out else None, args.resume)
        return 0
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    track = TrackRequest(args.track, args.recipe) if args.track else None
    try:
        metrics = train(cfg, out, resume=args.resume, mirror=args.mirror, mirror_wait=args.mirror_wait,
                        take_over=args.take_over, lease_seconds=args.lease_timeout, lease=not args.no_lease,
                        track=track)
    except RunStopped as stop:
        return stop.exit_code
    finally:
        distributed.shutdown()
    if os.environ.get("RANK", "0") == "0":
        # The last epoch's record, its fractions to 4 places as train.log gives them (0.175, not 0.17500000000000002).
        last = {k: metrics.get(k) for k in ("epoch", "val_top1", "val_top5")}
        print(json.dumps({"run": str(out), **{k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}}))
    return 0


def cmd_find_lr(args) -> int:
    from .data.synthetic import make_shapes_dataset
    from .training import distributed
    from .training.trainer import find_lr

    if args.start_lr >= args.end_lr:
        raise UserError(f"--start-lr {args.start_lr:g} is not below --end-lr {args.end_lr:g}: the sweep raises the LR "
                        "from the first to the second")
    _check_output_file(args.plot, "--plot")
    if not args.data:
        args.data, args.shapes = str(make_shapes_dataset(DEMO_DATA_DEFAULT)), True
    try:
        picks = find_lr(_config_for_train(args), args.plot, args.start_lr, args.end_lr, args.steps)
    finally:
        distributed.shutdown()
    if os.environ.get("RANK", "0") == "0":
        print(f"suggested peak LR {picks['suggested_lr']:.3g} at global batch {picks['global_batch']}: "
              f"--set optim.lr={picks['suggested_optim_lr_per_256']:.4g} (per 256 images); plot in {args.plot}",
              file=sys.stderr)
        print(json.dumps({**picks, "plot": str(args.plot)}))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation.command import evaluate_checkpoint, save_in_run

    if args.per_class_csv:
        _check_output_file(args.per_class_csv, "--per-class-csv")
    if args.plots:
        check_writable(Path(args.plots), "--plots")
    report = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, args.workers, args.device, args.size,
                                 args.flip, args.pipeline, args.per_class_csv, args.ema, args.real)
    if args.plots:
        from .report import draw_evaluation_plots

        report["plots"] = draw_evaluation_plots(report, Path(args.plots))
    saved = save_in_run(report)
    if saved:
        report["saved"] = str(saved)
    if args.json:
        print(json.dumps(report))
        return 0
    print("\n".join(evaluation_lines(report)))
    return 0


def evaluation_lines(report: dict) -> list[str]:
    """`evaluate`'s table: what was evaluated, the figures, the published ones beside them, where files went."""
    from .evaluation.metrics import NOT_IMAGENET_CLASSES
    from .published import table_lines

    lines = [f"checkpoint  {report['checkpoint']}", f"weights     {report['weights']}",
             f"data        {report['data']}: {report['images']:,} val images"
             + (f" ({report['skipped_images']} unreadable, skipped)" if report["skipped_images"] else "")
             + f", {report['size']} px, {report['pipeline']} pipeline" + (", flip averaged" if report["flip"] else ""),
             f"top-1       {report['top1']:.2%}", f"top-5       {report['top5']:.2%}"]
    real = report["real"]
    if real:
        top5 = f", top-5 {real['top5']:.2%}" if real["top5"] is not None else ""
        lines.append(f"ReaL        top-1 {real['top1']:.2%}{top5} on {real['images']:,} images ({real['left_out']:,} "
                     f"without a ReaL label left out; classes: {real['classes']})")
    elif report.get("real_not_measured", NOT_IMAGENET_CLASSES) != NOT_IMAGENET_CLASSES:  # ImageNet classes
        lines.append(f"ReaL        not measured: {report['real_not_measured']}")
    calibration = report["calibration"]
    lines.append(f"calibration ECE {calibration['ece']:.2%} ({len(calibration['bins'])} bins), NLL "
                 f"{calibration['nll']:.4f}, mean confidence {calibration['mean_confidence']:.2%} (accuracy "
                 f"{calibration['accuracy']:.2%})")
    if "classes" in report:
        lines.append(f"classes     {report['classes']}")
    if report["most_confused"]:
        lines.append("most confused, images: true -> predicted")
        lines += [f"  {pair['images']:6d}: {pair['true']} -> {pair['predicted']}" for pair in report["most_confused"]]
    if "published" in report:
        lines.append("beside the published ResNet-50 figures:")
        lines += ["  " + line for line in table_lines(report["published"]["ours"])]
    lines.append(f"per class   {report['per_class_csv']}" if "per_class_csv" in report
                 else "per class   not written (add --per-class-csv FILE)")
    if "plots" in report:
        lines.append(f"plots       {', '.join(report['plots'])}")
    if "saved" in report:
        beside = " beside the published figures" if "published" in report else ""
        lines.append(f"saved       {report['saved']} (`imagenet-resnet report RUN` shows it{beside})")
    return lines


def _check_output_file(path: str | Path, option: str) -> None:
    """A file a command writes at its end: its folder writable and the name not a folder's, said now in one
    line rather than as a traceback once the work is done."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give {option} a file name (in it, or anywhere you can write)")
    check_writable(path.parent, option)


def cmd_report(args) -> int:
    from .report import make_report

    if args.out or is_url(args.run):  # the plots and the log go to --out, or for a URL to ./report-NAME
        check_writable(Path(args.out or "."), "--out")
    elif Path(args.run).is_dir():  # the plots go to RUN/report, the log to RUN
        check_writable(Path(args.run), "--out")
    print(json.dumps(make_report(args.run, args.out)))
    return 0


def cmd_status(args) -> int:
    from .status import status_line, status_of

    found = status_of(args.run)
    if args.json:
        print(json.dumps(found))
    else:
        print("\n".join(status_line(status) for status in (found if isinstance(found, list) else [found])))
    return 0


def cmd_predict(args) -> int:
    from .serving.inference import image_sources, load_model, predict

    loaded = load_model(args.checkpoint, args.device, args.ema)
    results = predict(loaded, image_sources(args.inputs), args.top_k)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for record in results:
            print(record["file"])
            if "error" in record:
                print(f"  cannot read it: {record['error']}")
            for rank, top in enumerate(record.get("top", []), 1):
                print(f"  {rank}. {top['probability']:7.2%}  {top['name']}  ({top['class']})")
    return 0 if all("error" not in r for r in results) else 1


def check_cam_layer(model, layer: str | None) -> None:
    """--layer names a module of this model (a stage, or a block or layer inside one): one line naming the
    stages, not an AttributeError once the images are through the network."""
    modules = {name for name, _ in model.named_modules() if name}  # "" is the whole model: no map there
    if layer is not None and layer not in modules:
        stages = sorted(name for name in modules if name.startswith("layer") and "." not in name)
        raise UserError(f"--layer {layer}: this model has no such module; give one of {', '.join(stages)}, or a "
                        f"block inside one such as {stages[-1]}.0")


def cmd_explain(args) -> int:
    from .data.prepared import open_split
    from .serving.gradcam import cam_layer, explain_images, explain_mistakes
    from .serving.inference import image_sources, load_model

    if not args.inputs and not args.data:
        raise UserError("give IMAGE... to explain, or --data DIR for a gallery of misclassified validation images")
    _check_output_file(args.out, "--out")
    loaded = load_model(args.checkpoint, args.device, args.ema)
    check_cam_layer(loaded.model, args.layer)
    args.layer = args.layer or cam_layer(loaded.preset().size)
    if args.inputs:
        results = explain_images(loaded, image_sources(args.inputs), args.out, args.layer)
        unreadable = {r["file"]: r["error"] for r in results if "error" in r}
        explained = len(results) - len(unreadable)
        print(json.dumps({"images": explained, "unreadable": unreadable,
                          "gallery": str(args.out) if explained else None}))
        return 1 if unreadable else 0
    summary = explain_mistakes(loaded, open_split(args.data, "val"), args.out, args.num_show, args.layer)
    print(json.dumps(summary))
    return 0


def cmd_export(args) -> int:
    from .serving import export
    from .serving.inference import image_files, load_model
    from .serving.space import write_space
    from .serving.static_space import write_static_space

    # before the checkpoint loads, to fail fast; a Space (safetensors weights, Gradio's page) needs [serve] alone
    needs = {"safetensors": ["safetensors"], "onnx": ["onnx", "onnxscript", "onnxruntime"],
             "static-space": ["onnx", "onnxscript", "onnxruntime"]}
    if args.format == "space":
        export.require("safetensors", "gradio", "spaces", extra="serve")
    export.require(*needs.get(args.format, []))
    folder = args.format in ("space", "static-space")
    check_writable(Path(args.out) if folder else Path(args.out).parent, "--out")
    images = image_files(args.check_images) if args.check_images else None
    if args.check_images and not images:
        raise UserError(f"no images in {' '.join(args.check_images)}: give --check-images image files "
                        "or folders holding some")
    loaded = load_model(args.checkpoint, "cpu", args.ema)  # exports are made on the CPU, whatever machine this is
    if args.format == "safetensors":
        summary = export.export_safetensors(loaded, args.out, images)
    elif args.format == "onnx":
        summary = export.export_onnx(loaded, args.out, args.opset or export.ONNX_OPSET, images)
    elif args.format == "torchscript":
        summary = export.export_torchscript(loaded, args.out, images)
    elif args.format == "static-space":
        summary = write_static_space(loaded, Path(args.out), args.precision, images)
    else:
        summary = write_space(loaded, Path(args.out), images, args.hardware)
    written = [Path(v) for v in summary.values() if isinstance(v, str) and Path(v).exists()]
    sizes = {str(path): sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir()
             else path.stat().st_size for path in written}
    print(json.dumps({"format": args.format, "checkpoint": str(args.checkpoint), "weights_used": loaded.card["weights"],
                      **summary, "bytes": sizes}, indent=1))
    return 0


def cmd_serve(args) -> int:
    if importlib.util.find_spec("gradio") is None:  # optional: say how to get it rather than fail on import
        raise UserError('serving needs Gradio: pip install "imagenet-resnet[serve]"')
    from .serving.inference import image_files, load_model
    from .serving.serve import build_app, check_port, example_images, run_server

    check_port(args.host, args.port)
    loaded = load_model(args.checkpoint, args.device, args.ema)
    check_cam_layer(loaded.model, args.layer)  # now, not at the first request
    if args.examples:
        examples = image_files(args.examples)
    else:
        examples = example_images(loaded, Path(tempfile.mkdtemp(prefix="imagenet-resnet-examples-")))
        if not examples:
            print(f"no examples: the validation data ({loaded.cfg.data.path}) is not here; --examples adds some",
                  file=sys.stderr)
    run_server(build_app(loaded, examples, args.concurrency, args.max_queue, args.layer), args.host, args.port)
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import PackSettings, next_step, prepare, verify

    if args.verify:
        found = verify(args.verify, args.workers)
        for line in found:
            print(line)
        print(f"{args.verify}: {'OK' if not found else f'{len(found)} problems'}", file=sys.stderr)
        return 0 if not found else 1
    if not args.source or not args.out:
        raise UserError("give SOURCE and --out DATA (or --verify DATA)")
    if args.work_dir and not is_url(args.out):
        raise UserError(f"--work-dir goes with an --out at a URL; --out {args.out} is the folder prepared here")
    settings = PackSettings(args.short_side, args.quality, args.shard_images)
    try:
        manifest = prepare(args.source, args.out, pack=args.pack, settings=settings, limit=args.limit_per_class,
                           workers=args.workers, val_only=args.val_only, work_dir=args.work_dir)
    except KeyboardInterrupt:  # finished shards and the previous preparation are kept: the same command resumes
        print("imagenet-resnet prepare: interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    if is_url(args.out):
        from .data import upload

        print(upload.next_step(args.out.rstrip("/"), Path(args.work_dir or upload.default_work_dir(args.out))))
    else:
        print(next_step(args.out, manifest))
    return 0


def cmd_recipes(args) -> int:
    from .config import recipe_names

    print(f"{'recipe':34s} {'model':9s} {'epochs':>6s} {'batch':>6s}  what")
    for name in recipe_names():
        cfg = load_config(name)
        comments = [line[1:].strip() for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()
                    if line.startswith("#")]
        print(f"{name:34s} {cfg.model.name:9s} {cfg.train.epochs:6d} {cfg.train.batch_size:6d}  "
              f"{comments[0] if comments else ''}")
        # A recipe's figures, each with its source, from its "# published:" and "# measured:" comment lines.
        for kind, label, missing in (("published", "published", "published: none for this recipe"),
                                     ("measured", "measured by us", "not measured by us")):
            figures = [c.split(":", 1)[1].strip() for c in comments if c.startswith(f"{kind}:")]
            for figure in figures:
                print(f"    {label}: {figure}")
            if not figures:
                print(f"    {missing}")
    print(f"\nuse: imagenet-resnet train --recipe NAME ... (the files are in {RECIPES_DIR}; a path to your own "
          "YAML works too)")
    return 0


def cmd_demo(args) -> int:
    from .data.synthetic import complete_stamp, make_shapes_dataset

    started = time.perf_counter()
    out = Path(args.out)
    if (out / "last.pt").exists():
        raise UserError(f"--out {out} already holds a demo run; pass another --out or delete it")
    check_writable(out, "--out")
    reuse = complete_stamp(args.data).exists()
    if not reuse:
        check_writable(Path(args.data), "--data")
    print(f"{'reusing' if reuse else 'generating'} the shapes dataset (10 classes) in {args.data} ...", flush=True)
    data = make_shapes_dataset(args.data)
    from .training.trainer import train  # after the first line: torch alone takes seconds to import

    cfg = load_config(DEMO_RECIPE, [f"data.path={data}"])
    metrics = train(cfg, out, resume=True)  # a demo cut short before its first checkpoint starts again
    minutes = (time.perf_counter() - started) / 60
    print(f"""
demo finished in {minutes:.1f} min: val top-1 {metrics['val_top1']:.1%}, top-5 {metrics['val_top5']:.1%}

  dataset      {data}/{{train,val}}/<class>/*.jpg
  run folder   {out}/  (config.yaml, metrics.jsonl, train.log, last.pt, best.pt)

next:
  imagenet-resnet report {out}                       plots and training_log.md
  imagenet-resnet evaluate --checkpoint {out}/best.pt --data {data}
  imagenet-resnet explain --checkpoint {out}/best.pt --data {data} --out {out}/gradcam.png
  imagenet-resnet prepare /path/to/imagenet --out /data/imagenet-prepared --pack
  imagenet-resnet train --data /data/imagenet-prepared --recipe resnet50_ffcv32 --out runs/r50
""")
    return 0


OUT_OF_MEMORY_HINT = ("the GPU ran out of memory: lower --batch-size (the LR follows it) and raise "
                      "--set train.accumulation_steps=N to keep the global batch")


def _check_device(args) -> None:
    """A --device that is not here, or no device name (`gpu` is taken as cuda), is one line before anything
    loads, with advice naming this command's --device, not the config's --set train.device."""
    if getattr(args, "device", "auto") != "auto":
        from .runtime import resolve_device

        args.device = str(resolve_device(args.device, "--device"))


def _release_loader_workers(error: BaseException) -> None:
    """Loader workers ignore SIGTERM (the trainer owns stop signals), and those of a loader whose first batches
    failed to start (its sampler raised, say) are known only to its iterator, which only the failed frames hold:
    multiprocessing's exit handler would wait on them forever. Clearing those frames' variables (the traceback
    keeps its lines) frees the iterator, which stops its workers. Only when child processes are alive:
    elsewhere the variables stay for a post-mortem debugger."""
    multiprocessing = sys.modules.get("multiprocessing")  # not imported: no child processes to wait on
    if multiprocessing is not None and multiprocessing.active_children():
        traceback.clear_frames(error.__traceback__)
        gc.collect()  # an iterator in a reference cycle too


def _run_command(args) -> int:
    try:
        _check_device(args)
        return args.func(args)
    except BaseException as error:
        _release_loader_workers(error)
        raise


def one_line(error: UserError) -> str:
    """An expected error's message as the one line it promises, and nothing secret in it: a name it quotes from a
    file, a folder or an archive (anyone's) has its control characters (a line break, a terminal's escape) shown
    escaped, and credentials are blanked (storage.urls.redact)."""
    return printable(redact(str(error)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        return _run_command(args)
    except UserError as e:  # expected, and the message says what to do: one line
        print(f"imagenet-resnet {args.command}: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while training, or Ctrl-C anywhere else
        print(f"imagenet-resnet {args.command}: stopped at once (Ctrl-C); whatever was saved before is kept",
              file=sys.stderr)
        return 130
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError; torch is not imported here
            traceback.print_exc()
            print(f"imagenet-resnet {args.command}: {OUT_OF_MEMORY_HINT}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
