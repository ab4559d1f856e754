"""`evaluate` as papers report: ReaL accuracy, calibration, and the published ResNet-50 figures beside ours."""

import gzip
import json
import math

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, run_cli, train_tiny
from imagenet_fixtures import ImageNetLike, tiny_jpeg

from imagenet_resnet import cli
from imagenet_resnet.data.classes import imagenet_classes
from imagenet_resnet.data.prepare import prepare
from imagenet_resnet.data.real_labels import real_labels, val_numbers
from imagenet_resnet.evaluation.metrics import Predictions, calibration, real_accuracy

WNIDS = list(imagenet_classes())
SHIPPED_REAL = SHARED_DATA / "imagenet-meta" / "real.json"


def _predictions(names, top, labels=None):
    top = np.array(top, dtype=np.int64)
    labels = np.zeros(len(top), np.int64) if labels is None else np.array(labels)
    return Predictions(np.arange(len(top)), labels, top, np.full(len(top), 0.5), np.ones(len(top)))


def test_real_accuracy_scored_by_hand_in_any_layout_and_order():
    # The shipped lists of these four validation files (checked in the test below against the original file):
    # #1 has none (left out), #2 two classes, #4 one, #17 two.
    assert [real_labels()[k - 1] for k in (1, 2, 4, 17)] == [[], [970, 795], [809], [327, 108]]
    names = np.array([b"n09999999/ILSVRC2012_val_00000017.JPEG",  # a class-folder tree, out of order
                      b"ILSVRC2012_val_00000002_n03792782.JPEG",  # a Hugging Face copy's name
                      b"ILSVRC2012_val_00000001.JPEG",
                      b"val/ILSVRC2012_val_00000004.JPEG"])
    top = [[5, 6, 7, 8, 9],  # #17: neither 327 nor 108 anywhere: wrong, wrong
           [795, 1, 2, 3, 4],  # #2: its second ReaL class first: right, right
           [0, 1, 2, 3, 4],  # #1: left out, whatever it predicts
           [1, 2, 809, 3, 4]]  # #4: 809 third: top-1 wrong, top-5 right
    real = real_accuracy(_predictions(names, top), names, WNIDS)
    assert real["images"] == 3 and real["left_out"] == 1
    assert real["top1"] == pytest.approx(1 / 3) and real["top5"] == pytest.approx(2 / 3)
    assert real["classes"] == "all 1,000"


def test_real_accuracy_on_a_subset_of_classes_keeps_the_datas_classes_of_each_list():
    classes = [WNIDS[108], WNIDS[795], WNIDS[809]]  # data labels 0, 1, 2
    names = np.array([b"ILSVRC2012_val_00000002.JPEG", b"ILSVRC2012_val_00000004.JPEG",
                      b"ILSVRC2012_val_00000017.JPEG", b"ILSVRC2012_val_00000003.JPEG"])
    # #2 [970, 795] -> {1}; #4 [809] -> {2}; #17 [327, 108] -> {0}; #3 [230, 231] -> {} left out.
    top = [[1, 0, 2], [0, 2, 1], [0, 1, 2], [0, 1, 2]]
    real = real_accuracy(_predictions(names, top), names, classes)
    assert (real["images"], real["left_out"]) == (3, 1)
    assert real["top1"] == pytest.approx(2 / 3)
    assert real["top5"] is None  # three classes: no top-5 to speak of
    assert real["classes"] == "restricted to the data's 3 classes"


def test_no_real_accuracy_for_files_that_are_not_imagenet_validation_images():
    names = np.array([b"ILSVRC2012_val_00000002.JPEG", b"cat/0001.jpg"])
    why = real_accuracy(_predictions(names, [[0], [0]]), names, WNIDS)
    assert why.startswith("1 of the 2 images are not ImageNet-1k validation files") and "cat/0001.jpg" in why
    assert list(val_numbers(np.array([b"ILSVRC2012_val_00050000.JPEG", b"ILSVRC2012_val_00050001.JPEG",
                                      b"ILSVRC2012_val_000000012.JPEG"]))) == [50000, 0, 0]
    named = np.array([b"ILSVRC2012_val_00000002.JPEG"])
    assert real_accuracy(_predictions(named, [[0]]), named, ["cat", "dog"]) == \
        "the data's classes are not ImageNet-1k's WordNet IDs"


def test_expected_calibration_error_of_hand_made_logits():
    # Softmax confidences 0.95, 0.95, 0.55 (two live classes) and 0.375 (three: logits 0, ln 1.5, ln 1.5).
    logits = [[math.log(q), math.log(1 - q), -1e9] for q in (0.95, 0.95, 0.55)] + [[0.0, math.log(1.5), math.log(1.5)]]
    confidence = torch.tensor(logits, dtype=torch.float64).softmax(1).max(1).values.numpy()
    assert confidence == pytest.approx([0.95, 0.95, 0.55, 0.375])
    correct = np.array([True, False, True, False])
    result = calibration(confidence, correct)
    # 15 bins (lo, hi]: 0.95 in (14/15, 1], 0.55 in (8/15, 9/15], 0.375 in (5/15, 6/15].
    # ECE = 2/4 |0.5 - 0.95| + 1/4 |1 - 0.55| + 1/4 |0 - 0.375| = 0.225 + 0.1125 + 0.09375
    assert result["ece"] == pytest.approx(0.43125)
    assert {k: b["images"] for k, b in enumerate(result["bins"]) if b["images"]} == {14: 2, 8: 1, 5: 1}
    assert result["bins"][14]["accuracy"] == 0.5 and result["bins"][14]["confidence"] == pytest.approx(0.95)
    assert result["mean_confidence"] == pytest.approx(0.70625) and result["accuracy"] == 0.5
    # A bin's upper edge is inside it: 1.0 in the last bin, 1/15 (as linspace gives it) in the first.
    edges = np.linspace(0, 1, 16)
    upper = calibration(np.array([1.0, edges[1]]), np.array([True, True]))
    assert upper["bins"][14]["images"] == 1 and upper["bins"][0]["images"] == 1


@pytest.mark.skipif(not SHIPPED_REAL.is_file(), reason="../shared/data/imagenet-meta/real.json is not here")
def test_shipped_real_labels_are_the_published_file():
    original = json.loads(SHIPPED_REAL.read_text())
    assert real_labels() == original
    assert len(original) == 50_000 and sum(1 for labels in original if not labels) == 3_163


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
    """A ResNet trained one epoch on 1,000 tiny images, one per ImageNet-1k class, from the official tars
    prepared and packed, with 40 validation files named as ImageNet's (#1-#40, whose ReaL lists include empty
    and multi-class ones); the same images as class folders too."""
    root = tmp_path_factory.mktemp("imagenet-like")
    like = ImageNetLike(val_count=40)
    data = root / "prepared"
    prepare(like.official(root / "official"), data, pack=True, workers=2)
    train_tiny(data, root / "run", "data.train_size=16", "data.eval_size=16", epochs=1)
    return like.folders(root / "folders"), data, root / "run"


def test_evaluate_on_imagenet_validation_files_reports_real_calibration_and_the_published_figures(imagenet_run, tmp_path):
    folders, data, run = imagenet_run
    proc = run_cli("evaluate", "--json", "--checkpoint", str(run / "best.pt"), "--data", str(data), "--workers", "0",
                   "--device", "cpu", "--plots", str(tmp_path / "plots"))
    report = json.loads(proc.stdout)
    # ReaL recomputed here from `predict`, which reads each file as evaluate does: the same top-1 per image.
    files = sorted((folders / "val").glob("*/*.JPEG"))
    predicted = json.loads(run_cli("predict", "--json", "--top-k", "1000", "--checkpoint", str(run / "best.pt"),
                                   "--device", "cpu", *map(str, files)).stdout)
    real, scored, right1, right5 = real_labels(), 0, 0, 0
    # `predict`'s probabilities of every class, with the set's own labels (each file's folder): the NLL, -log
    # p(true class) (probabilities to 5 decimals: about 0.005 on the log of the ~0.001 here), and the confidence.
    true_probability = [next(t["probability"] for t in result["top"] if t["class"] == path.parent.name)
                        for path, result in zip(files, predicted)]
    assert min(true_probability) > 0
    confidence = sum(result["top"][0]["probability"] for result in predicted) / len(files)
    for path, result in zip(files, predicted):
        wanted = {WNIDS[c] for c in real[int(path.stem[-8:]) - 1]}
        if wanted:
            scored += 1
            right1 += result["top"][0]["class"] in wanted
            right5 += any(p["class"] in wanted for p in result["top"][:5])
    assert 0 < scored < 40  # some of #1-#40 have no ReaL label
    assert report["real"]["images"] == scored and report["real"]["left_out"] == 40 - scored
    assert report["real"]["top1"] == pytest.approx(right1 / scored)
    assert report["real"]["top5"] == pytest.approx(right5 / scored)
    calibration_report = report["calibration"]
    assert len(calibration_report["bins"]) == 15 and sum(b["images"] for b in calibration_report["bins"]) == 40
    nll = sum(-math.log(p) for p in true_probability) / len(files)
    assert report["loss"] == pytest.approx(nll, abs=0.01) and calibration_report["nll"] == pytest.approx(nll, abs=0.01)
    assert calibration_report["mean_confidence"] == pytest.approx(confidence, abs=1e-4)
    # (Its accuracy beside predict's: test_explain, where a model gets some images right and some wrong.)
    assert report["benchmark"] == "val"
    assert set(report["published"]["ours"]) == {"val", "real"}
    names = [row["name"] for row in report["published"]["rows"]]
    assert any(n.startswith("torchvision V1") for n in names) and any(n.startswith("FFCV, 88") for n in names)
    assert sorted(report["plots"]) == [str(tmp_path / "plots" / name) for name in ("per_class.png", "reliability.png")]
    for plot in report["plots"]:
        assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # Kept in the run folder, where `report` sets it beside the published figures.
    saved = json.loads(open(report["saved"]).read())
    assert saved["top1"] == report["top1"] and len(saved["per_class"]) == 1000
    made = json.loads(run_cli("report", str(run), "--out", str(tmp_path / "report")).stdout)
    assert made["evaluations"] == 1
    log = (tmp_path / "report" / "training_log.md").read_text()
    assert "## Evaluations" in log and "ReaL top-1" in log and "torchvision V1 weights" in log
    assert "timm's results CSVs" in log


def test_the_table_shows_real_and_the_published_rows(imagenet_run, capsys):
    folders, data, run = imagenet_run
    assert cli.main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data), "--workers", "0",
                     "--device", "cpu", "--real"]) == 0
    out = capsys.readouterr().out
    assert "ReaL        top-1" in out and "without a ReaL label left out" in out
    assert "calibration ECE" in out and "NLL" in out and "mean confidence" in out
    assert "beside the published ResNet-50 figures" in out and "ImageNet-1k val" in out and "ReaL labels" in out
    assert "published figures, not measured by us" in out


def test_real_asked_for_data_without_it_says_why_in_one_line(tiny_data, tmp_path):
    run = tmp_path / "run"
    train_tiny(tiny_data, run, epochs=1)
    proc = run_cli("evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(tiny_data), "--workers", "0",
                   "--real", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--real: no ReaL accuracy" in last and "the data's classes are not ImageNet-1k's WordNet IDs" in last
    # Without --real: figures, no ReaL, no published table (these are not ImageNet's classes).
    report = json.loads(run_cli("evaluate", "--json", "--checkpoint", str(run / "best.pt"), "--data",
                                str(tiny_data), "--workers", "0").stdout)
    assert report["real"] is None and "published" not in report and report["calibration"]["ece"] >= 0


def test_shipped_real_labels_file_is_gzip_of_json():
    from importlib import resources

    data = resources.files("imagenet_resnet.data").joinpath("real_labels.json.gz").read_bytes()
    assert len(json.loads(gzip.decompress(data))) == 50_000
    assert "Apache License" in resources.files("imagenet_resnet.data").joinpath("real_labels.LICENSE").read_text()


def test_evaluate_on_imagenet_v2_scores_folder_k_as_class_k_beside_the_published_v2_figures(imagenet_run, tmp_path):
    _, _, run = imagenet_run
    v2 = tmp_path / "imagenetv2-matched-frequency-format-val"
    for k in (2, 10, 100):  # as strings "10" < "100" < "2": the order a generic folder reader would number them
        (v2 / str(k)).mkdir(parents=True)
        for j in range(2):
            (v2 / str(k) / f"{k}-{j}.jpeg").write_bytes(tiny_jpeg(k * 10 + j))
    for data in (v2, tmp_path):  # the extracted folder, and the folder holding it
        report = json.loads(run_cli("evaluate", "--json", "--checkpoint", str(run / "best.pt"), "--data", str(data),
                                    "--workers", "0", "--device", "cpu").stdout)
        assert report["images"] == 6
        assert {row["class"]: row["images"] for row in report["per_class"] if row["images"]} == \
            {WNIDS[2]: 2, WNIDS[10]: 2, WNIDS[100]: 2}
        assert report["benchmark"] == "v2" and report["real"] is None
        assert set(report["published"]["ours"]) == {"v2"}
        rows = {row["name"]: row for row in report["published"]["rows"]}
        assert rows["torchvision V1 weights (90 epochs, step LR)"]["v2"]["top1"] == pytest.approx(0.6333)
        assert not any(name.startswith("FFCV") for name in rows)  # FFCV publishes no V2 figure
    prepared = tmp_path / "v2-prepared"
    prepare(v2, prepared, workers=1)
    out = run_cli("evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(prepared), "--workers", "0",
                  "--device", "cpu").stdout
    assert "ImageNet-V2" in out and "ReaL labels" not in out and "63.33%" in out


def test_imagenet_classes_from_files_that_are_not_validation_images_say_why_there_is_no_real(imagenet_run, tmp_path,
                                                                                             capsys):
    _, _, run = imagenet_run
    for k, name in enumerate(("n01440764_10040.JPEG", "ILSVRC2012_val_00000002.JPEG")):  # as Imagenette mixes them
        (tmp_path / "val" / WNIDS[k]).mkdir(parents=True)
        (tmp_path / "val" / WNIDS[k] / name).write_bytes(tiny_jpeg(k))
    assert cli.main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(tmp_path), "--workers", "0",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert ("ReaL        not measured: 1 of the 2 images are not ImageNet-1k validation files (named "
            f"ILSVRC2012_val_<8 digits>, as '{WNIDS[0]}/n01440764_10040.JPEG' is not)") in out
    assert "beside the published" not in out  # two classes are not ImageNet-1k
