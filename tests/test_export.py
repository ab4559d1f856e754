"""export (safetensors, ONNX, TorchScript) and bench infer."""

import copy
import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, run_cli, train_tiny
from imagenet_resnet import cli
from imagenet_resnet.data.synthetic import draw_image
from imagenet_resnet.errors import UserError
from imagenet_resnet.serving import export
from imagenet_resnet.serving.inference import load_model, sidecar


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_data):
    run = tmp_path_factory.mktemp("export") / "run"
    # channels_last as on a GPU: exports must not depend on the model's memory layout
    train_tiny(tiny_data, run, "model.channels_last=true", epochs=1)
    return run / "best.pt"


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint, "cpu")


@pytest.fixture(scope="module")
def onnx_export(loaded, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    return export.export_onnx(loaded, tmp_path_factory.mktemp("onnx") / "model")


def _logits(model, batch):
    with torch.inference_mode():
        return model(batch).numpy()


def _encoded(fmt: str, width: int, height: int, label: int) -> bytes:
    image = draw_image(label, max(width, height), np.random.default_rng(label)).resize((width, height))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_safetensors_round_trip_gives_identical_logits_and_card(loaded, tmp_path):
    pytest.importorskip("safetensors")
    written = export.export_safetensors(loaded, tmp_path / "model")
    again = load_model(written["weights"], "cpu")
    batch = export.check_batches(loaded)["images"]
    assert np.array_equal(_logits(again.model, batch), _logits(loaded.model, batch))
    assert again.card == loaded.card and again.classes == loaded.classes and again.names == loaded.names
    assert again.preset().size == loaded.preset().size == 32 and again.cfg.model.channels_last
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta.pop("exports") == {"safetensors": {"file": "model.safetensors",
                                                   "sha256": _sha256(tmp_path / "model.safetensors")}}
    assert meta == json.loads(json.dumps(sidecar(loaded)))
    parity = written["parity"]
    assert parity["random"]["max_abs_diff"] == parity["images"]["max_abs_diff"] == 0.0
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644  # readable by a server's own user


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failed_export_leaves_the_files_it_would_replace(checkpoint, onnx_export, tmp_path, capsys):
    """Issue 35: an export whose check images held an empty file exited 2 after replacing model.onnx."""
    shutil.copy(onnx_export["sidecar"], tmp_path / "model.json")
    (tmp_path / "model.onnx").write_bytes(b"an earlier export, of another model")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    images = tmp_path / "check"
    images.mkdir()
    (images / "shape.jpg").write_bytes(_encoded("JPEG", 70, 50, 3))
    (images / "empty.jpg").write_bytes(b"")
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out",
                     str(tmp_path / "model.onnx"), "--check-images", str(images)]) == 2
    assert "empty.jpg" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_one_sidecar_describes_one_model_and_lists_its_exports(loaded, tmp_path):
    """Issue 35: a safetensors export rewrote the sidecar an existing export of another model was described by."""
    pytest.importorskip("safetensors")
    export.export_torchscript(loaded, tmp_path / "model")
    before = (tmp_path / "model.json").read_bytes()
    other = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    with pytest.raises(UserError, match=rf"^--out {tmp_path / 'model.safetensors'}: {tmp_path / 'model.json'} "
                                        rf"describes {tmp_path / 'model.torchscript'}, exported from run/best.pt with "
                                        "other weights; one sidecar describes one model: give --out another name"):
        export.export_safetensors(other, tmp_path / "model")
    assert (tmp_path / "model.json").read_bytes() == before and not (tmp_path / "model.safetensors").exists()
    export.export_safetensors(loaded, tmp_path / "model")  # the same model: its sidecar lists both
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["checkpoint"] == "run/best.pt" and meta["weights_sha256"] == sidecar(loaded)["weights_sha256"]
    assert meta["exports"] == {name: {"file": f"model.{name}", "sha256": _sha256(tmp_path / f"model.{name}")}
                               for name in ("torchscript", "safetensors")}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.json", "model.safetensors", "model.torchscript"]


def test_onnx_has_the_contract_and_a_dynamic_batch(loaded, onnx_export):
    session = export.onnx_session(onnx_export["model"])
    (images,), (logits,) = session.get_inputs(), session.get_outputs()
    assert (images.name, images.type, images.shape[1:]) == ("images", "tensor(float)", [3, 32, 32])
    assert (logits.name, logits.shape[1:]) == ("logits", [10])
    assert isinstance(images.shape[0], str)  # symbolic: any batch size
    reference = export.cpu_fp32_copy(loaded.model)
    for batch_size in (1, 5):
        batch = torch.randn(batch_size, 3, 32, 32)
        got = session.run(["logits"], {"images": batch.numpy()})[0]
        assert got.shape == (batch_size, 10)
        np.testing.assert_allclose(got, _logits(reference, batch), atol=1e-4, rtol=0)
    for name in ("random", "images"):
        assert onnx_export["parity"][name]["max_abs_diff"] < 1e-3 and onnx_export["parity"][name]["top1_agreement"] == 1
    assert json.loads(open(onnx_export["sidecar"]).read())["classes"] == loaded.classes


def _onnx_parity(loaded, onnx_export, files):
    session = export.onnx_session(onnx_export["model"])
    return export.compare_logits(export.cpu_fp32_copy(loaded.model),
                                 lambda x: session.run(["logits"], {"images": x.numpy()})[0],
                                 export.check_batches(loaded, files), "test")


def test_onnx_matches_pytorch_on_generated_png_and_jpeg(loaded, onnx_export, tmp_path):
    files = []
    for k, (fmt, width, height) in enumerate([("PNG", 90, 60), ("JPEG", 50, 120), ("JPEG", 33, 33)]):
        files.append(tmp_path / f"{k}.{fmt.lower()}")
        files[-1].write_bytes(_encoded(fmt, width, height, k))
    parity = _onnx_parity(loaded, onnx_export, files)
    assert parity["images"]["images"] == 3 and parity["images"]["max_abs_diff"] < 1e-3
    assert parity["images"]["top1_agreement"] == 1.0


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-samples-200").is_dir(), reason="no ../shared/data")
def test_onnx_matches_pytorch_on_real_photos(loaded, onnx_export):
    files = sorted((SHARED_DATA / "imagenet-samples-200").iterdir())[:40]
    parity = _onnx_parity(loaded, onnx_export, files)
    assert parity["images"]["images"] == 40 and parity["images"]["max_abs_diff"] < 1e-3


def test_a_runtime_that_disagrees_fails_loudly(loaded):
    model = export.cpu_fp32_copy(loaded.model)
    with pytest.raises(ValueError, match=r"model\.onnx: logits on the random batch differ .* by up to 0\.01"):
        export.compare_logits(model, lambda x: _logits(model, x) + 0.01, export.check_batches(loaded), "model.onnx")
    with pytest.raises(ValueError, match="up to nan"):
        export.compare_logits(model, lambda x: _logits(model, x) * np.nan, export.check_batches(loaded), "model.onnx")


def test_check_images_that_cannot_be_used_are_named(loaded, checkpoint, tmp_path, capsys):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.jpg: not a readable image"):
        export.check_batches(loaded, [tmp_path / "notes.jpg"])
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out",
                     str(tmp_path / "model"), "--check-images", str(tmp_path / "empty")]) == 2
    assert "no images in" in capsys.readouterr().err and not (tmp_path / "model.torchscript").exists()


def test_torchscript_reloads_and_matches(loaded, tmp_path):
    written = export.export_torchscript(loaded, tmp_path / "model")
    assert written["model"].endswith("model.torchscript") and (tmp_path / "model.json").is_file()
    reloaded = torch.jit.load(written["model"])
    batch = torch.randn(5, 3, 32, 32)
    np.testing.assert_allclose(_logits(reloaded, batch), _logits(export.cpu_fp32_copy(loaded.model), batch),
                               atol=1e-5, rtol=0)
    assert written["parity"]["images"]["max_abs_diff"] < 1e-5


def test_a_missing_package_names_the_pip_extra(checkpoint, tmp_path):
    extra = r'pip install "imagenet-resnet\[export\]"$'
    with pytest.raises(UserError, match=r"^no_such_package_xyz not installed: " + extra):
        export.require("torch", "no_such_package_xyz")
    hide_onnxruntime = ("import sys; sys.modules['onnxruntime'] = None; from imagenet_resnet.cli import main; "
                        f"raise SystemExit(main(['export', '--checkpoint', {str(checkpoint)!r}, '--format', 'onnx', "
                        f"'--out', {str(tmp_path / 'model')!r}]))")
    proc = subprocess.run([sys.executable, "-c", hide_onnxruntime], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not list(tmp_path.iterdir())
    assert proc.stderr == 'imagenet-resnet export: onnxruntime not installed: pip install "imagenet-resnet[export]"\n'


@pytest.mark.parametrize("fmt, suffix, needs", [("safetensors", ".safetensors", ["safetensors"]),
                                                ("onnx", ".onnx", ["onnxruntime", "onnxscript"]),
                                                ("torchscript", ".torchscript", [])])
def test_cli_export_writes_the_files_it_reports(checkpoint, tmp_path, fmt, suffix, needs):
    for package in needs:
        pytest.importorskip(package)
    image = tmp_path / "shape.jpg"
    image.write_bytes(_encoded("JPEG", 70, 50, 3))
    summary = json.loads(run_cli("export", "--checkpoint", str(checkpoint), "--format", fmt, "--out",
                                 str(tmp_path / "out" / "model"), "--check-images", str(image)).stdout)
    model_file = tmp_path / "out" / f"model{suffix}"
    assert summary["format"] == fmt and model_file.is_file() and (tmp_path / "out" / "model.json").is_file()
    assert summary["bytes"][str(model_file)] == model_file.stat().st_size > 10_000
    assert summary["parity"]["images"]["images"] == 1 and summary["parity"]["images"]["max_abs_diff"] < 1e-3


def test_cli_export_space_folder(checkpoint, tmp_path):
    proc = run_cli("export", "--checkpoint", str(checkpoint), "--format", "space", "--out", str(tmp_path / "space"))
    assert json.loads(proc.stdout)["format"] == "space" and any((tmp_path / "space").iterdir())


def test_cli_bench_infer_records_latency_percentiles(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "infer", "--checkpoint", str(checkpoint), "--batch-sizes", "1", "4", "--iterations", "4",
                   "--warmup", "1", "--threads", "1", "--out", str(out))
    record = json.loads(out.read_text())
    assert record["command"].startswith("imagenet-resnet bench infer --checkpoint") and record["threads"] == 1
    assert record["cpu"] and record["environment"]["torch"] == torch.__version__ and record["environment"]["onnxruntime"]
    assert record["onnx_parity"]["max_abs_diff"] < 1e-3
    assert [(r["runtime"], r["batch_size"]) for r in record["results"]] == [
        ("pytorch", 1), ("onnxruntime", 1), ("pytorch", 4), ("onnxruntime", 4)]
    for r in record["results"]:
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p99"] and r["iterations"] == 4 and r["images_per_s"] > 0
        assert r["per_image_ms_p50"] == pytest.approx(r["latency_ms_p50"] / r["batch_size"], abs=1e-3)
    assert "onnxruntime      4" in proc.stdout
