"""The `imagenet-resnet` command: prepare, train, find-lr, evaluate, report, predict, explain, export, serve, bench,
demo."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from . import bench, distributed
from .config import PIPELINES, Config, ConfigError, load_config
from .export import ONNX_OPSET

DEMO_DATA_DEFAULT = Path.home() / ".cache" / "imagenet-resnet" / "shapes"

# The demo: a narrow ResNet-18 on 64 px shapes, sized to finish in about two minutes on two CPU cores.
DEMO_SETTINGS = [
    "model.name=resnet18", "model.width=16", "model.channels_last=false",
    "data.train_size=56", "data.eval_size=56", "data.crop_scale=[0.35, 1.0]", "data.workers=2",
    "optim.lr=0.8", "optim.weight_decay=5e-5", "optim.label_smoothing=0.1",
    "schedule.name=onecycle", "schedule.pct_start=0.25",
    "train.epochs=16", "train.batch_size=64", "train.device=cpu", "train.deterministic=true",
    "train.log_every_steps=0",
]


def _train_parser(sub, name: str = "train", help: str = "train a ResNet") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("--data", help="a prepared folder, or one with train/<class>/ and val/<class>/ "
                   "(default: the built-in shapes dataset)")
    if name == "train":
        p.add_argument("--out", help="run folder (default: runs/<date-time>)")
    p.add_argument("--recipe", help="YAML recipe, e.g. recipes/resnet50_step90.yaml")
    p.add_argument("--model", help="resnet18 | resnet34 | resnet50 | resnet101 | resnet152")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per process per forward pass")
    if name == "train":
        p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt if there is one")
        p.add_argument("--init-from", help="start from these weights (torchvision/timm ResNet state dict or one of "
                       "our checkpoints); a head for another number of classes is replaced")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set optim.lr=0.2 (repeatable)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagenet-resnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)

    p = sub.add_parser("evaluate", help="top-1/top-5, most confused classes, per-class accuracy (JSON on stdout)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a prepared folder, or one with val/<class>/")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, help="evaluation resolution (default: the run's data.eval_size)")
    p.add_argument("--flip", action="store_true", help="average each image's logits with its mirror image's")
    p.add_argument("--pipeline", choices=PIPELINES, help="how images are decoded and resized (default: the run's "
                   "data.pipeline); `reference` is torchvision's Resize + CenterCrop, to check the fast path")
    p.add_argument("--per-class-csv", help="write accuracy per class (with names) to this CSV")

    p = sub.add_parser("report", help="plots (loss, accuracy, LR, speed) and training_log.md for a run folder")
    p.add_argument("run", help="the run folder (finished, still going, or resumed)")
    p.add_argument("--out", help="folder for the plots (default: RUN/report)")

    p = sub.add_parser("predict", help="top-k classes with names and probabilities for images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("explain", help="Grad-CAM: a gallery of misclassified validation images, or of given images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="*", metavar="IMAGE|DIR", help="images to explain (else --data)")
    p.add_argument("--data", help="a prepared folder or class-folder tree: its misclassified val images")
    p.add_argument("--num-show", type=int, default=20)
    p.add_argument("--layer", help="module to explain at (default: the deepest stage still at least 7 x 7: layer4 at "
                   "224 px, layer2 for the demo's 56 px)")
    p.add_argument("--out", default="gradcam.png")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("serve", help="a web page (and JSON endpoint) that classifies uploaded images, with Grad-CAM")
    p.add_argument("--checkpoint", required=True, help="one of our checkpoints (.pt) or an exported .safetensors")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only; "
                   "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--examples", nargs="+", metavar="IMAGE|DIR",
                   help="example images to offer (default: one per class from the model's validation data, if here)")
    p.add_argument("--concurrency", type=int, default=2, help="requests the model works on at once (default 2)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait; more are told the server is "
                   "busy (default 32)")
    p.add_argument("--layer", help="module for Grad-CAM (default: the deepest stage still at least 7 x 7: layer4 at "
                   "224 px)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("prepare", help="check an ImageNet source and index it; --pack writes a fast packed copy")
    p.add_argument("source", nargs="?", help="ILSVRC2012 tars + devkit, Kaggle layout, HF parquet shards, "
                   "tiny-imagenet-200, or train/<class>/ + val/<class>/")
    p.add_argument("--out", help="the prepared folder to write (train with --data OUT)")
    p.add_argument("--pack", action="store_true", help="also write a packed copy (JPEG shards with an offset index)")
    p.add_argument("--short-side", type=int, default=256,
                   help="packed images' short side cap in px (0: keep; default 256, as the resize-256-crop-224 eval)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--shard-images", type=int, default=4096, help="images per packed shard file (default 4096)")
    p.add_argument("--limit-per-class", type=int, default=0, metavar="N", help="only the first N images of each class")
    p.add_argument("--workers", type=int, default=-1, help="processes (default: one per core)")
    p.add_argument("--verify", metavar="DATA", help="re-check a prepared folder instead")

    p = _train_parser(sub, "find-lr", "LR range test: sweep the LR exponentially, plot loss vs LR, suggest a peak LR")
    p.add_argument("--plot", default="lr_find.png", help="where to write the plot (and its numbers as .json)")
    p.add_argument("--start-lr", type=float, default=1e-5)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=200, help="steps of the sweep (it stops early once the loss explodes)")

    p = sub.add_parser("export", help="safetensors + JSON sidecar, ONNX or TorchScript (each read back and compared "
                       "with PyTorch), or a Hugging Face Space folder; prints a JSON summary")
    p.add_argument("--checkpoint", required=True, help="one of our checkpoints (.pt) or a .safetensors export")
    p.add_argument("--format", required=True, choices=["safetensors", "onnx", "torchscript", "space"])
    p.add_argument("--out", required=True, help="the file to write (the format sets its suffix; the JSON sidecar "
                   "goes beside it), or for space the folder")
    p.add_argument("--check-images", nargs="+", metavar="IMAGE|DIR", help="images to compare the export's logits "
                   "with PyTorch's on (default: a few synthetic ones); for space, the example images")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET})")

    bench.add_parser(sub)

    p = sub.add_parser("demo", help="generate a small shapes dataset, train a small ResNet on CPU, evaluate")
    p.add_argument("--out", default="demo-run", help="run folder (default: ./demo-run)")
    p.add_argument("--data", default=str(DEMO_DATA_DEFAULT), help=f"where to write the dataset (default: {DEMO_DATA_DEFAULT})")
    return parser


def _config_for_train(args) -> Config:
    overrides = [] if args.recipe else list(DEMO_SETTINGS) if not args.data else []
    overrides += [f"data.path={args.data}"] if args.data else []
    for flag, key in (("model", "model.name"), ("epochs", "train.epochs"), ("batch_size", "train.batch_size"),
                      ("init_from", "train.init_from")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return load_config(args.recipe, overrides + args.overrides)


def cmd_train(args) -> int:
    from .data.synthetic import make_shapes_dataset
    from .engine import RunStopped, train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (args.data and args.out):
        raise ValueError("under torchrun give --data and --out, so that every process uses the same folders")
    if not args.data:
        args.data = str(make_shapes_dataset(DEMO_DATA_DEFAULT))
        print(f"no --data given: training on the built-in shapes dataset in {args.data}"
              + ("" if args.recipe else " with the demo's settings"), flush=True)
    cfg = _config_for_train(args)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        metrics = train(cfg, out, resume=args.resume)
    except RunStopped as stop:
        return stop.exit_code
    finally:
        distributed.shutdown()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"run": str(out), **{k: metrics.get(k) for k in ("epoch", "val_top1", "val_top5")}}))
    return 0


def cmd_find_lr(args) -> int:
    from .data.synthetic import make_shapes_dataset
    from .engine import find_lr

    if not args.data:
        args.data = str(make_shapes_dataset(DEMO_DATA_DEFAULT))
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
    import csv

    import torch

    from .data.loader import EpochBatchSampler, ImageDataset, SkippedImages, build_loader
    from .data.prepared import open_split
    from .data.presets import make_eval_preset, pipeline_description
    from .engine import evaluate
    from .inference import load_model

    loaded = load_model(args.checkpoint, args.device)
    val_index = open_split(args.data, "val", classes=loaded.classes)
    size = args.size or loaded.cfg.data.eval_size
    pipeline = args.pipeline or loaded.cfg.data.pipeline
    dataset = ImageDataset(val_index, make_eval_preset(pipeline, size, loaded.cfg.data.eval_crop_ratio))
    sampler = EpochBatchSampler(len(dataset), args.batch_size, shuffle=False, drop_last=False)
    loader = build_loader(dataset, sampler, args.workers, loaded.device.type == "cuda")
    skipped, n = SkippedImages(), len(loaded.classes)
    confusion = torch.zeros(n, n, dtype=torch.int64, device=loaded.device)
    result = evaluate(loaded.model, loader, loaded.normalize, loaded.precision, skipped, args.flip, confusion)
    confusion = confusion.cpu()
    per_class = confusion.sum(1)
    off_diagonal = confusion - torch.diag(torch.diag(confusion))
    counts, flat = off_diagonal.flatten().topk(min(10, n * n))
    confused = [{"true": loaded.names[int(k) // n], "predicted": loaded.names[int(k) % n], "images": int(c)}
                for c, k in zip(counts, flat) if c > 0]
    report = {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"], "images": result["images"],
              "skipped_images": skipped.count, "size": size, "flip": args.flip,
              "pipeline": pipeline_description(pipeline), "most_confused": confused,
              "checkpoint": str(args.checkpoint), "data": str(args.data)}
    if args.per_class_csv:
        with open(args.per_class_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "class", "name", "images", "correct", "accuracy"])
            for k in range(n):
                total, right = int(per_class[k]), int(confusion[k, k])
                writer.writerow([k, loaded.classes[k], loaded.names[k], total, right,
                                 f"{right / total:.4f}" if total else ""])
        report["per_class_csv"] = str(args.per_class_csv)
    print(json.dumps(report))
    return 0


def cmd_report(args) -> int:
    from .report import make_report

    print(json.dumps(make_report(args.run, args.out)))
    return 0


def cmd_predict(args) -> int:
    from .inference import image_files, load_model, predict

    loaded = load_model(args.checkpoint, args.device)
    results = predict(loaded, image_files(args.inputs), args.top_k)
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


def cmd_explain(args) -> int:
    from .gradcam import cam_layer, explain_images, explain_mistakes
    from .inference import image_files, load_model

    loaded = load_model(args.checkpoint, args.device)
    args.layer = args.layer or cam_layer(loaded.preset().size)
    if args.inputs:
        results = explain_images(loaded, image_files(args.inputs), args.out, args.layer)
        summary = {"images": len(results), "unreadable": [r["file"] for r in results if "error" in r]}
    elif args.data:
        from .data.prepared import open_split

        summary = explain_mistakes(loaded, open_split(args.data, "val", classes=loaded.classes), args.out,
                                   args.num_show, args.layer)
    else:
        raise ValueError("give IMAGE... to explain, or --data DIR for a gallery of misclassified validation images")
    print(json.dumps({**summary, "gallery": str(args.out)}))
    return 0


def cmd_export(args) -> int:
    from . import export
    from .inference import image_files, load_model

    # before the checkpoint loads, to fail fast; a Space carries its weights as safetensors
    needs = {"safetensors": ["safetensors"], "onnx": ["onnx", "onnxscript", "onnxruntime"], "space": ["safetensors"]}
    export.require(*needs.get(args.format, []))
    images = image_files(args.check_images) if args.check_images else None
    if args.check_images and not images:
        raise FileNotFoundError(f"no images in {' '.join(args.check_images)}: give --check-images image files "
                                "or folders holding some")
    loaded = load_model(args.checkpoint, "cpu")  # exports are made on the CPU, whatever machine this is
    if args.format == "safetensors":
        summary = export.export_safetensors(loaded, args.out)
        summary["parity"] = export.check_safetensors(loaded, summary["weights"], images)
    elif args.format == "onnx":
        summary = export.export_onnx(loaded, args.out, args.opset, images)
    elif args.format == "torchscript":
        summary = export.export_torchscript(loaded, args.out, images)
    else:
        from .space import write_space

        summary = write_space(loaded, Path(args.out), images)
    written = [Path(v) for v in summary.values() if isinstance(v, str) and Path(v).exists()]
    sizes = {str(path): sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir()
             else path.stat().st_size for path in written}
    print(json.dumps({"format": args.format, "checkpoint": str(args.checkpoint), **summary, "bytes": sizes}, indent=1))
    return 0


def cmd_serve(args) -> int:
    if importlib.util.find_spec("gradio") is None:  # optional: say how to get it rather than fail on import
        raise RuntimeError('serving needs Gradio: pip install "imagenet-resnet[serve]"')
    from .inference import image_files, load_model
    from .serve import build_app, example_images, run_server

    loaded = load_model(args.checkpoint, args.device)
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
    from .data.prepare import PackSettings, prepare, verify

    if args.verify:
        found = verify(args.verify, args.workers)
        for line in found:
            print(line)
        print(f"{args.verify}: {'OK' if not found else f'{len(found)} problems'}", file=sys.stderr)
        return 0 if not found else 1
    if not args.source or not args.out:
        raise ValueError("give SOURCE and --out DATA (or --verify DATA)")
    settings = PackSettings(args.short_side, args.quality, args.shard_images)
    prepare(args.source, args.out, pack=args.pack, settings=settings, limit=args.limit_per_class, workers=args.workers)
    print(f"next: imagenet-resnet train --data {args.out} --recipe recipes/resnet50_onecycle40.yaml --out runs/r50")
    return 0


def cmd_demo(args) -> int:
    from .data.synthetic import make_shapes_dataset
    from .engine import train

    started = time.perf_counter()
    out = Path(args.out)
    if (out / "last.pt").exists():
        print(f"{out} already holds a demo run; pass another --out or delete it", file=sys.stderr)
        return 2
    print(f"generating the shapes dataset (10 classes) in {args.data} ...", flush=True)
    data = make_shapes_dataset(args.data)
    cfg = load_config(None, DEMO_SETTINGS + [f"data.path={data}"])
    metrics = train(cfg, out)
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
  imagenet-resnet train --data /data/imagenet-prepared --recipe recipes/resnet50_ffcv32.yaml --out runs/r50
""")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        commands = {"train": cmd_train, "evaluate": cmd_evaluate, "prepare": cmd_prepare, "find-lr": cmd_find_lr,
                    "report": cmd_report, "predict": cmd_predict, "explain": cmd_explain, "export": cmd_export,
                    "serve": cmd_serve, "demo": cmd_demo, "bench": bench.main}
        return commands[args.command](args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"imagenet-resnet {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
