"""Grad-CAM, predict, explain and the extended evaluate."""

import csv
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, train_tiny
from imagenet_resnet.serving.gradcam import grad_cam
from imagenet_resnet.models import build_model


class _ColourDetector(torch.nn.Module):
    """Class 0 = how red the image is, class 1 = how green, through a named 1x1-conv feature layer."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 2, 1, bias=False)
        self.features.weight.data = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).view(2, 3, 1, 1)
        self.fc = torch.nn.Linear(2, 2, bias=False)
        self.fc.weight.data = torch.eye(2)

    def forward(self, x):
        return self.fc(torch.relu(self.features(x)).mean(dim=(2, 3)))


def test_grad_cam_peaks_where_the_class_evidence_is():
    image = torch.zeros(1, 3, 32, 32)
    image[:, 1] = 1.0  # green everywhere ...
    image[:, 1, 4:12, 20:28] = 0.0
    image[:, 0, 4:12, 20:28] = 1.0  # ... but one red square, top right
    model = _ColourDetector()
    red = grad_cam(model, image, torch.tensor([0]), layer="features")[0]
    inside, outside = red[4:12, 20:28], torch.cat([red[16:].flatten(), red[:, :16].flatten()])
    assert red.max() == pytest.approx(1.0) and inside.min() > 0.9 and outside.max() < 0.1
    green = grad_cam(model, image, torch.tensor([1]), layer="features")[0]
    assert green[4:12, 20:28].max() < 0.1 and green[20:, :10].min() > 0.9


def test_grad_cam_on_a_resnet_at_any_layer():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5, width=8).eval()
    x = torch.randn(2, 3, 64, 64)
    predicted = model(x).argmax(1)  # the class each image is taken for: the one with evidence for it here
    for layer in ("layer4", "layer3.1", "layer4.1.conv2"):
        cams = grad_cam(model, x, predicted, layer=layer)
        assert cams.shape == (2, 64, 64) and cams.min() >= 0
        assert cams.amax(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0])  # scaled to peak at 1: not all zero
        assert (cams < 0.99).float().mean() > 0.5  # and a map, not a constant
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    run = tmp_path_factory.mktemp("explain") / "run"
    train_tiny(tiny_data, run)
    return run / "last.pt"


def _write(path, img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return path


def test_predict_reads_png_grayscale_and_cmyk(tmp_path, trained, tiny_data):
    source = Image.open(next((tiny_data / "val").glob("*/*"))).convert("RGB")
    files = [_write(tmp_path / "a.png", source.convert("RGBA"), "PNG"), _write(tmp_path / "b.jpg", source.convert("L"), "JPEG"),
             _write(tmp_path / "c.jpg", source.convert("CMYK"), "JPEG")]
    results = json.loads(run_cli("predict", "--checkpoint", str(trained), "--json", "--device", "cpu",
                                 *map(str, files)).stdout)
    assert [r["file"] for r in results] == [str(f) for f in files]
    for r in results:
        assert len(r["top"]) == 5 and sum(t["probability"] for t in r["top"]) <= 1.0001
        assert r["top"][0]["probability"] >= r["top"][1]["probability"] and r["top"][0]["name"]
    # A 16-bit PNG reads as its 8-bit twin (PIL's own convert("RGB") would clip it to white).
    gray = np.asarray(source.convert("L"))
    twins = [_write(tmp_path / "gray8.png", Image.fromarray(gray), "PNG"),
             _write(tmp_path / "gray16.png", Image.fromarray(gray.astype(np.uint16) * 257), "PNG")]
    eight, sixteen = json.loads(run_cli("predict", "--checkpoint", str(trained), "--json", "--device", "cpu",
                                        *map(str, twins)).stdout)
    assert eight["top"] == sixteen["top"]
    (tmp_path / "empty.jpg").write_bytes(b"")
    proc = run_cli("predict", "--checkpoint", str(trained), "--device", "cpu", str(tmp_path), check=False)
    assert proc.returncode == 1 and "empty.jpg\n  cannot read it: the file is empty" in proc.stdout and "1. " in proc.stdout


def test_evaluate_per_class_counts_add_up(tmp_path, trained, tiny_data):
    out = json.loads(run_cli("evaluate", "--json", "--checkpoint", str(trained), "--data", str(tiny_data), "--workers", "0",
                             "--device", "cpu", "--flip", "--size", "40", "--per-class-csv",
                             str(tmp_path / "classes.csv")).stdout)
    rows = list(csv.DictReader(open(tmp_path / "classes.csv")))
    assert len(rows) == 10 and sum(int(r["images"]) for r in rows) == out["images"] == 40
    assert sum(int(r["correct"]) for r in rows) / out["images"] == pytest.approx(out["top1"])
    assert out["flip"] and out["size"] == 40
    wrong = sum(int(r["images"]) - int(r["correct"]) for r in rows)
    assert sum(p["images"] for p in out["most_confused"]) <= wrong


def test_explain_gallery_of_mistakes_and_of_any_image(tmp_path, trained, tiny_data):
    out = json.loads(run_cli("explain", "--checkpoint", str(trained), "--data", str(tiny_data), "--num-show", "6",
                             "--out", str(tmp_path / "mistakes.png"), "--device", "cpu").stdout)
    assert out["images"] == 40 and out["shown"] == min(6, out["misclassified"])
    if out["shown"]:
        assert Image.open(tmp_path / "mistakes.png").format == "PNG"
    image = next((tiny_data / "val").glob("*/*"))
    out = json.loads(run_cli("explain", "--checkpoint", str(trained), str(image), "--out", str(tmp_path / "one.png"),
                             "--device", "cpu").stdout)
    assert out["images"] == 1 and Image.open(tmp_path / "one.png").size[0] > 200


def test_evaluate_and_explain_on_a_subset_of_the_models_classes(trained, tiny_data, tmp_path):
    """Imagenette for an ImageNet-1k model: the data's classes map onto the model's by ID, and the model
    chooses among those only."""
    from imagenet_resnet.evaluation.command import evaluate_checkpoint
    from imagenet_resnet.serving.inference import load_model

    subset = tmp_path / "subset"
    for name in ("circle", "star", "triangle"):
        shutil.copytree(tiny_data / "val" / name, subset / "val" / name)
    report = evaluate_checkpoint(trained, subset, workers=0)
    assert report["images"] == 12 and "3 of the model's 10 classes" in report["classes"]
    loaded = load_model(trained, "cpu")
    model_of = [loaded.classes.index(name) for name in ("circle", "star", "triangle")]
    hits = 0
    for label, name in enumerate(("circle", "star", "triangle")):
        for image in sorted((subset / "val" / name).iterdir()):
            with torch.no_grad():
                logits = loaded.model(loaded.normalize(torch.from_numpy(loaded.preset()(image.read_bytes())[None])))
            hits += int(logits[0, model_of].argmax()) == label
    assert report["top1"] == pytest.approx(hits / 12)
    gallery = json.loads(run_cli("explain", "--checkpoint", str(trained), "--data", str(subset), "--out",
                                 str(tmp_path / "g.png"), "--device", "cpu").stdout)
    assert gallery["images"] == 12 and gallery["misclassified"] == round(12 - hits)


def test_evaluate_names_the_classes_the_model_does_not_know(trained, tiny_data, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_data / "val" / "circle", odd / "val" / "circle")
    shutil.copytree(tiny_data / "val" / "star", odd / "val" / "dragon")
    proc = run_cli("evaluate", "--checkpoint", str(trained), "--data", str(odd), "--device", "cpu", check=False)
    assert proc.returncode == 2
    assert "1 of its 2 classes are not the model's (dragon)" in proc.stderr and "prepare it again" not in proc.stderr


def test_predict_keeps_the_order_and_goes_on_past_bad_names(tmp_path, trained, tiny_data):
    good = sorted((tiny_data / "val").glob("*/*"))[::7][:3]
    (tmp_path / "nothing-here").mkdir()
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    names = [good[0], tmp_path / "missing.jpg", good[1], tmp_path / "broken.jpg", tmp_path / "nothing-here", good[2]]
    proc = run_cli("predict", "--checkpoint", str(trained), "--json", "--device", "cpu", *map(str, names), check=False)
    assert proc.returncode == 1
    results = json.loads(proc.stdout)
    assert [r["file"] for r in results] == [str(n) for n in names]
    assert ["top" in r for r in results] == [True, False, True, False, False, True]
    assert results[1]["error"] == "no such file or folder" and results[4]["error"].startswith("a folder with no images")
    assert not any("upload" in r.get("error", "") for r in results)  # words for a web page, not a command line


def test_explain_on_unreadable_images_only_fails_and_names_no_gallery(tmp_path, trained):
    (tmp_path / "empty.jpg").write_bytes(b"")
    proc = run_cli("explain", "--checkpoint", str(trained), str(tmp_path / "empty.jpg"), "--out",
                   str(tmp_path / "gallery.png"), "--device", "cpu", check=False)
    summary = json.loads(proc.stdout)
    assert proc.returncode == 1 and summary["gallery"] is None and not (tmp_path / "gallery.png").exists()
    assert "empty" in summary["unreadable"][str(tmp_path / "empty.jpg")]


def test_evaluate_scores_what_predict_predicts(trained, tiny_data):
    """evaluate's top-1 and calibration accuracy, and its loss, beside `predict` on the same files: a code path of
    its own, whose labels come here from each file's folder, not from the index evaluate reads."""
    report = json.loads(run_cli("evaluate", "--json", "--checkpoint", str(trained), "--data", str(tiny_data),
                                "--workers", "0", "--device", "cpu").stdout)
    files = sorted((tiny_data / "val").glob("*/*"))
    predicted = json.loads(run_cli("predict", "--json", "--top-k", "10", "--checkpoint", str(trained),
                                   "--device", "cpu", *map(str, files)).stdout)
    right = sum(result["top"][0]["class"] == path.parent.name for path, result in zip(files, predicted))
    assert 0 < right < len(files) == report["images"]  # some right, some wrong: a mix-up of the two would show
    assert report["top1"] == report["calibration"]["accuracy"] == pytest.approx(right / len(files))
    nll = [-math.log(next(t["probability"] for t in result["top"] if t["class"] == path.parent.name))
           for path, result in zip(files, predicted)]
    assert report["loss"] == pytest.approx(sum(nll) / len(nll), abs=1e-3)


def test_evaluate_prints_a_table_and_json_when_asked(trained, tiny_data):
    table = run_cli("evaluate", "--checkpoint", str(trained), "--data", str(tiny_data), "--workers", "0").stdout
    report = json.loads(run_cli("evaluate", "--json", "--checkpoint", str(trained), "--data", str(tiny_data),
                                "--workers", "0").stdout)
    assert f"top-1       {report['top1']:.2%}" in table and "40 val images" in table
    assert not table.lstrip().startswith("{")
