"""The Static Space's page in headless Chromium on this machine: its weight, its time to the first answer, and its
agreement with `predict`, for each way model.onnx can store its weights (fp32, fp16, int8).

    python benchmarks/static_space.py [--checkpoint RUN/best.pt] [--photos DIR ...] [--json FILE]

- weight and time: an ImageNet ResNet-50 (1,000 classes; freshly initialised: neither the file's size nor the
  time depends on the values), exported with `write_static_space` and served from loopback by tests/static_host.py
  with the Space's headers. The time to the first answer is from the start of navigation to the first top-5 of
  `?image=examples/...`, each repeat in a new browser context (nothing cached, as a first visit); then the model's
  own time on a second image.
- agreement: `--checkpoint` (a trained model) exported each way; every photo in `--photos` classified by the page
  and by `predict`: top-1 agreement and the largest difference in any probability, counted apart for the photos
  `predict` decodes at a reduced DCT scale (large JPEGs), which the browser decodes at full size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imagenet_resnet.bench.record import environment, save_record
from imagenet_resnet.config import load_config
from imagenet_resnet.data.classes import display_name, imagenet_classes
from imagenet_resnet.data.presets import EvalPreset
from imagenet_resnet.models import build_model_from_config
from imagenet_resnet.runtime import DeviceNormalize
from imagenet_resnet.serving.inference import LoadedModel, load_model, model_card
from imagenet_resnet.serving.static_space import first_visit_files, runtime_version, write_static_space

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import CHROMIUM, CHROMIUM_FLAGS, hosted, page_answer  # noqa: E402 (the tests' loopback host)

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parents[1] / "shared" / "data" / "imagenet-samples-200"
PRECISIONS = ("fp32", "fp16", "int8")


def imagenet_resnet50() -> LoadedModel:
    cfg = load_config(None, ["model.name=resnet50", "data.eval_size=224"])
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model, 1000).eval()
    classes = list(imagenet_classes())
    names = [display_name(c) for c in classes]
    card = model_card(cfg, classes, {}, None, sum(p.numel() for p in model.parameters()))
    return LoadedModel(model, cfg, classes, names, torch.device("cpu"), "fp32",
                       DeviceNormalize(torch.device("cpu"), cfg.model.channels_last), card)


def model_ms(status: str) -> float:
    return float(status.split("(the model ")[1].split(" ms")[0])


def weight_and_time(browser, work: Path, photo: Path, second: Path, repeats: int) -> dict:
    loaded, rows = imagenet_resnet50(), {}
    for precision in PRECISIONS:
        site = work / f"resnet50-{precision}"
        summary = write_static_space(loaded, site, precision, [photo, second])
        meta = json.loads((site / "model.json").read_text())
        first, model = [], []
        with hosted(site) as url:
            for _ in range(repeats):
                context = browser.new_context()  # a first visit: nothing cached
                page = context.new_page()
                example = meta["examples"][0]
                page.goto(f"{url}/?image=examples/{example}")
                page_answer(page, example, 600_000)
                first.append(float(page.evaluate("document.body.dataset.firstAnswerMs")))
                page.locator("#examples button").nth(1).click()
                model.append(model_ms(page_answer(page, meta["examples"][1], 600_000)[1]))
                context.close()
        rows[precision] = {
            "model_onnx_bytes": summary["model_bytes"],
            "page_bytes": sum(f.stat().st_size for f in first_visit_files(site, meta)),
            "page_files": {str(f.relative_to(site)): f.stat().st_size for f in first_visit_files(site, meta)},
            "first_answer_ms": {"median": statistics.median(first), "runs": first},
            "model_ms_second_image": {"median": statistics.median(model), "runs": model},
            "parity_with_pytorch": summary["parity"],
        }
        print(precision, json.dumps({k: v for k, v in rows[precision].items() if k != "page_files"}), flush=True)
    return rows


def agreement(browser, work: Path, checkpoint: Path, photos: list[Path]) -> dict:
    loaded = load_model(checkpoint, "cpu")
    full_decode = EvalPreset(loaded.preset().size, loaded.preset().crop_ratio, full_decode=True)
    with torch.inference_mode():
        predicted = {p: loaded.model(loaded.normalize(torch.from_numpy(loaded.input_pixels(p)[None])))
                     .float().softmax(1)[0].numpy() for p in photos}
    scaled = {p for p in photos if not np.array_equal(full_decode(p.read_bytes()), loaded.input_pixels(p))}
    rows = {}
    for precision in PRECISIONS:
        site = work / f"trained-{precision}"
        summary = write_static_space(loaded, site, precision, photos[:4])
        same, diffs = {"as_stored": [], "scaled": []}, {"as_stored": [], "scaled": []}
        with hosted(site) as url:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.body.dataset.state === 'ready'", timeout=600_000)
            for photo in photos:
                page.set_input_files("#file", str(photo))
                got = np.array(page_answer(page, photo.name, 600_000)[0]["probabilities"])
                kind = "scaled" if photo in scaled else "as_stored"
                same[kind].append(bool(got.argmax() == predicted[photo].argmax()))
                diffs[kind].append(float(np.abs(got - predicted[photo]).max()))
            page.close()
        rows[precision] = {
            "model_onnx_bytes": summary["model_bytes"], "parity_with_pytorch": summary["parity"],
            **{kind: {"photos": len(same[kind]), "top1_same": sum(same[kind]),
                      "max_probability_difference": max(diffs[kind], default=None),
                      "median_probability_difference": statistics.median(diffs[kind]) if diffs[kind] else None}
               for kind in same}}
        print(precision, json.dumps(rows[precision]), flush=True)
    return {"checkpoint": str(checkpoint), "architecture": loaded.card["architecture"],
            "val_top1": loaded.card.get("val_top1"), "input_size": loaded.preset().size, "precisions": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained model for the agreement with predict")
    parser.add_argument("--photos", type=Path, nargs="+", default=[SAMPLES], help="folders of real photos")
    parser.add_argument("--repeats", type=int, default=3, help="first visits per precision")
    parser.add_argument("--json", help="also write the record here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    photos = sorted(p for folder in args.photos for p in folder.iterdir() if p.is_file())
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        started = time.time()
        record = {"command": " ".join(["python", "benchmarks/static_space.py", *sys.argv[1:]]),
                  "environment": environment(), "cpu_count": os.cpu_count(), "chromium": browser.version,
                  "onnxruntime_web": runtime_version(),
                  "resnet50_imagenet": weight_and_time(browser, Path(tmp), photos[0], photos[1], args.repeats)}
        if args.checkpoint:
            record["agreement"] = agreement(browser, Path(tmp), args.checkpoint, photos)
        record["seconds"] = round(time.time() - started)
        browser.close()
    print(json.dumps(record))
    save_record(record, args.json)


if __name__ == "__main__":
    main()
