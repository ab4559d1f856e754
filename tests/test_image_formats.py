"""Images are opened with an explicit list of formats on every path (security issue 34): an EPS, which Pillow's
EPS plugin would hand to Ghostscript, reaches no decoder in predict, serve, the exported Space, prepare or the
training loader. A stand-in `gs` first on PATH records any call; a file refused by format is one line where
other unreadable files are (predict's output, the HTTP error, problems.tsv, the loader's warning). Then a short
Hypothesis fuzz of all those paths (benchmarks/fuzz_images.py runs a long one)."""

import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from PIL import Image

from conftest import train_tiny
from image_fuzz import DOS_EPS, EPS, ghostscript_stand_in, image_bytes, open_every_way
from imagenet_resnet import cli
from imagenet_resnet.data.index import ImageIndex
from imagenet_resnet.data.loader import ImageDataset
from imagenet_resnet.data.prepare import prepare
from imagenet_resnet.data.presets import make_eval_preset, make_train_preset
from imagenet_resnet.serving.images import ImageRejected, safe_open_image
from imagenet_resnet.serving.inference import load_model

needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                  reason='needs Gradio: pip install "imagenet-resnet[serve]"')
UPLOAD_REFUSAL = "not a readable image: use a JPEG, PNG, WebP, GIF, BMP or TIFF file"
DATA_REFUSAL = "not an image file (no image format recognised)"


@pytest.fixture
def gs_calls(tmp_path) -> Path:
    """The file the stand-in `gs` writes when it runs: it must never exist."""
    with ghostscript_stand_in(tmp_path / "stand-in-bin") as calls:
        yield calls


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_data) -> Path:
    run = tmp_path_factory.mktemp("formats") / "run"
    train_tiny(tiny_data, run, epochs=1)
    return run / "last.pt"


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height pixels."""
    data = bytearray(encode(Image.new("RGB", (16, 16), "teal"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_the_stand_in_is_what_pillow_runs_for_an_eps(gs_calls):
    """Without the list of formats, Pillow runs `gs` on an EPS: the stand-in notices, so the tests below can."""
    with pytest.raises(OSError), Image.open(io.BytesIO(EPS)) as image:
        image.load()
    assert gs_calls.exists()


def test_each_path_reads_the_formats_it_promises():
    from imagenet_resnet.data.folder import IMAGE_EXTENSIONS
    from imagenet_resnet.data.untrusted_images import DATA_FORMATS, UPLOAD_FORMATS

    format_of = Image.registered_extensions()
    assert {format_of[extension] for extension in IMAGE_EXTENSIONS} == set(DATA_FORMATS.names)  # all, and no more
    # predict and serve open an upload with UPLOAD_FORMATS, then their eval preset opens it again with DATA_FORMATS
    assert set(UPLOAD_FORMATS.names) <= set(DATA_FORMATS.names) and "EPS" not in DATA_FORMATS.names
    rgb = Image.new("RGB", (24, 16), "orange")
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert safe_open_image(encode(rgb, fmt)).shape == (16, 24, 3), fmt
    with pytest.raises(ImageRejected, match=UPLOAD_REFUSAL):  # a format the serve page does not promise
        safe_open_image(encode(rgb, "PPM"))


def test_predict_answers_an_eps_in_one_line_without_running_gs(checkpoint, tiny_data, tmp_path, capsys, gs_calls):
    eps = tmp_path / "drawing.jpg"
    eps.write_bytes(EPS)
    photo = next((tiny_data / "val").rglob("*.jpg"))
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", str(eps), str(photo)]) == 1
    assert not gs_calls.exists()
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [str(eps), f"  cannot read it: {UPLOAD_REFUSAL}"] and out[2] == str(photo) and len(out) == 8


@needs_gradio
def test_serve_refuses_an_eps_with_415_without_running_gs(checkpoint, gs_calls):
    from starlette.testclient import TestClient

    from imagenet_resnet.serving.serve import Classifier, build_app

    loaded = load_model(checkpoint, "cpu")
    with pytest.raises(ImageRejected) as refused:  # what the page's upload handler calls
        Classifier(loaded)(EPS, explain=True)
    answer = TestClient(build_app(loaded)).post("/api/classify", content=EPS)
    assert not gs_calls.exists()
    assert str(refused.value) == UPLOAD_REFUSAL and refused.value.status == 415
    assert answer.status_code == 415 and answer.json() == {"error": UPLOAD_REFUSAL}


@needs_gradio
def test_the_exported_space_refuses_an_eps_without_running_gs(checkpoint, tmp_path, gs_calls):
    """The Space's app.py imports the copy of the package beside it: that copy is what must refuse."""
    from imagenet_resnet.serving.space import write_space

    space = tmp_path / "space"
    write_space(load_model(checkpoint, "cpu"), space)
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(EPS)
    post = ("import json, sys; from starlette.testclient import TestClient; import app, imagenet_resnet; "
            "answer = TestClient(app.app).post('/api/classify', content=open(sys.argv[1], 'rb').read()); "
            "print(json.dumps([imagenet_resnet.__file__, answer.status_code, answer.json()]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # PATH: the stand-in's first
    proc = subprocess.run([sys.executable, "-c", post, str(eps)], cwd=space, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    imported, status, answer = json.loads(proc.stdout.splitlines()[-1])
    assert Path(imported).parent == space / "imagenet_resnet"  # the Space's copy, not this checkout
    assert not gs_calls.exists()
    assert status == 415 and answer == {"error": UPLOAD_REFUSAL}


def test_prepare_lists_an_eps_named_jpeg_and_prepares_the_rest(tiny_data, tmp_path, gs_calls):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    classes = sorted(p.name for p in (data / "train").iterdir())
    (data / "train" / classes[0] / "a.JPEG").write_bytes(EPS)
    images = {split: len(list((tiny_data / split).rglob("*.jpg"))) for split in ("train", "val")}
    manifest = prepare(data, tmp_path / "out", workers=2)  # the worker pool, where the EPS used to crash
    assert not gs_calls.exists()
    with open(tmp_path / "out" / "problems.tsv") as f:
        problems = list(csv.DictReader(f, delimiter="\t"))
    assert [(row["where"], row["kind"], row["action"]) for row in problems] == [
        (str(data / "train" / classes[0] / "a.JPEG"), "unreadable", "left out")]
    assert DATA_REFUSAL in problems[0]["detail"] and "convert it to JPEG" in problems[0]["detail"]
    assert {split: manifest["splits"][split]["images"] for split in images} == images


@pytest.mark.parametrize("pipeline", ["fast", "full-decode", "reference"])
def test_the_loader_skips_an_eps_and_a_bomb_and_reads_odd_imagenet_files(pipeline, tmp_path, gs_calls):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    files = {
        "drawing.JPEG": EPS,
        "bomb.JPEG": jpeg_claiming(20000, 10000),  # 200 megapixels claimed by the header libjpeg-turbo reads
        "png.JPEG": encode(rgb, "PNG"),  # ImageNet's PNG and CMYK files named .JPEG are still read
        "cmyk.JPEG": encode(rgb.convert("CMYK"), "JPEG"),
        "photo.JPEG": encode(rgb, "JPEG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    index = ImageIndex("files", tmp_path, np.array(list(files), dtype=np.bytes_), np.zeros(len(files), np.int32),
                       ["a"])
    for preset in (make_train_preset(pipeline, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
                   make_eval_preset(pipeline, 32, 0.875)):
        dataset = ImageDataset(index, preset)
        read = {name: dataset[(0, i, 0)] for i, name in enumerate(files)}
        assert not gs_calls.exists()
        assert read["drawing.JPEG"][0] is None and read["drawing.JPEG"][2].startswith(
            f"{tmp_path / 'drawing.JPEG'}: {DATA_REFUSAL}")
        assert read["bomb.JPEG"][0] is None and "178 megapixel" in read["bomb.JPEG"][2]
        for name in ("png.JPEG", "cmyk.JPEG", "photo.JPEG"):
            assert read[name][0].shape == (32, 32, 3) and read[name][2] is None, name


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's, on each corrupt EXIF block or truncated read
@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=image_bytes())
@example(data=EPS)
@example(data=DOS_EPS)
def test_fuzzed_bytes_are_read_or_refused_on_every_path_quickly_and_never_reach_gs(data, gs_calls):
    open_every_way(data)
    assert not gs_calls.exists()
