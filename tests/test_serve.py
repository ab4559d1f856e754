"""`imagenet-resnet serve` and `export --format space`: the upload checks, the JSON endpoint, the page in a real
browser (Debian's Chromium driven by Playwright), a load test, and the exported Space running on its own."""

import asyncio
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli, train_tiny
from helpers import CHROMIUM, CHROMIUM_FLAGS, free_port, png_header, start_server, stop
from imagenet_resnet.serving import export as onnx_export
from imagenet_resnet.serving.inference import load_model
from imagenet_resnet.serving.serve import MAX_UPLOAD_BYTES, Classifier, ImageRejected, example_images, safe_open_image

REPO = Path(__file__).resolve().parents[1]
needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                  reason='needs Gradio: pip install "imagenet-resnet[serve]"')


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def colourful(width: int = 48, height: int = 32) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], -1).astype(np.uint8))


def odd_images() -> dict[str, bytes]:
    """Images that are fine but not plain 8-bit RGB: each must be classified."""
    ramp = (np.arange(48 * 32).reshape(32, 48) * 40).astype(np.uint16)
    frames = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue")]
    return {
        "gray16.png": encode(Image.fromarray(ramp), "PNG"),
        "alpha.png": encode(colourful().convert("RGBA"), "PNG"),
        "cmyk.jpg": encode(colourful().convert("CMYK"), "JPEG"),
        "gray.jpg": encode(colourful().convert("L"), "JPEG"),
        "palette.png": encode(colourful().convert("P"), "PNG"),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
    }


def bad_inputs() -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, the HTTP status, words the message must hold)."""
    jpeg = encode(colourful(400, 300), "JPEG", quality=95)
    return {
        "empty.jpg": (b"", 400, "empty (0 bytes)"),
        "notes.txt": (b"this is not an image\n" * 50, 415, "not a readable image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], 422, "truncated or damaged"),
        "header-cut.jpg": (jpeg[:300], 422, "a JPEG file, truncated or damaged"),  # issue 35: was 415, "not an image"
        "many-pixels.png": (png_header(8000, 6000), 413, "(48 megapixels), over the 40 megapixel limit"),
        "bomb.png": (png_header(60_000, 60_000), 413, "decompression bomb"),
        "float.tif": (encode(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF"), 415, "floating-point"),
    }


def test_safe_open_image_makes_8_bit_rgb_of_any_image():
    odd = {name: safe_open_image(data) for name, data in odd_images().items()}
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in odd.values())
    ramp = (np.arange(48 * 32).reshape(32, 48) * 40).astype(np.uint16)
    gray16 = odd["gray16.png"]
    assert np.abs(gray16[..., 0].astype(int) - ramp / 257).max() <= 0.5 and gray16[..., 0].min() == 0  # not clipped
    assert (gray16[..., 0] == gray16[..., 2]).all()
    original = np.asarray(colourful()).astype(int)
    assert np.abs(odd["alpha.png"] - original).max() == 0
    assert np.abs(odd["cmyk.jpg"] - original).mean() < 4  # the colours survive CMYK, up to JPEG's loss
    assert (odd["gray.jpg"][..., 0] == odd["gray.jpg"][..., 1]).all()
    assert (odd["animated.gif"] == [255, 0, 0]).all()  # the first frame

    half_transparent = np.asarray(colourful().convert("RGBA")).copy()
    half_transparent[:, :24, 3] = 0
    on_white = safe_open_image(encode(Image.fromarray(half_transparent), "PNG"))
    assert (on_white[:, :24] == 255).all() and (on_white[:, 24:] == original[:, 24:]).all()

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a phone held upright
    assert safe_open_image(encode(colourful(), "JPEG", exif=exif)).shape == (48, 32, 3)


def test_safe_open_image_refuses_with_one_clear_line(tmp_path):
    for name, (data, status, words) in bad_inputs().items():
        with pytest.raises(ImageRejected, match=re.escape(words)) as refused:
            safe_open_image(data)
        assert refused.value.status == status and "\n" not in str(refused.value), name
    too_big = tmp_path / "big.jpg"
    too_big.write_bytes(b"\xff\xd8" + bytes(MAX_UPLOAD_BYTES))
    with pytest.raises(ImageRejected, match="over the 20 MiB limit"):
        safe_open_image(too_big)  # from the file's size, before reading it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_data) -> Path:
    run = tmp_path_factory.mktemp("serve") / "run"
    train_tiny(tiny_data, run, epochs=1)
    return run / "last.pt"


def test_one_photo_gets_the_same_probabilities_from_evaluate_predict_serve_and_onnx(checkpoint, tmp_path):
    """Issue 14: predict and serve disagreed (tench: 65.49% against 59.65%): they read images two ways."""
    from imagenet_resnet.serving.inference import image_sources, predict

    loaded = load_model(checkpoint, "cpu")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode(colourful(333, 250), "JPEG", quality=90))  # resized and cropped, as photos are
    # evaluate reads a validation image's bytes through the eval preset:
    with torch.no_grad():
        pixels = loaded.preset()(photo.read_bytes())
        evaluated = loaded.model(loaded.normalize(torch.from_numpy(pixels[None]))).float().softmax(1)[0]
    assert np.array_equal(loaded.input_pixels(photo), pixels)
    expected = sorted(((round(float(p), 5), loaded.classes[k]) for k, p in enumerate(evaluated)), reverse=True)[:5]
    predicted = predict(loaded, image_sources([str(photo)]))[0]["top"]
    served, _ = Classifier(loaded)(photo)
    for answer in (predicted, served):
        assert [(t["probability"], t["class"]) for t in answer] == expected
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        written = onnx_export.export_onnx(loaded, tmp_path / "model")
        session = onnx_export.onnx_session(written["model"])
        batch = loaded.normalize(torch.from_numpy(loaded.input_pixels(photo)[None])).float().numpy()
        logits = session.run([onnx_export.ONNX_OUTPUT], {onnx_export.ONNX_INPUT: batch})[0]
        np.testing.assert_allclose(torch.from_numpy(logits).softmax(1)[0].numpy(), evaluated.numpy(), atol=1e-4)


def test_server_preprocessing_is_the_eval_preset_and_threads_do_not_mix(checkpoint, tiny_data):
    loaded = load_model(checkpoint, "cpu")
    classifier = Classifier(loaded, concurrency=4)
    png = encode(Image.open(next((tiny_data / "val").glob("*/*"))), "PNG")
    assert np.array_equal(loaded.input_pixels(png), loaded.preset()(png))

    # Grad-CAM hooks a layer: requests running at once must each get the map of their own image.
    files = sorted((tiny_data / "val").glob("*/*"))[::4][:8]
    alone = [classifier(file, explain=True) for file in files]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda file: classifier(file, explain=True), files))
    for (top_a, overlay_a), (top_b, overlay_b) in zip(alone, together):
        assert [t["class"] for t in top_a] == [t["class"] for t in top_b]
        assert np.abs(overlay_a.astype(int) - overlay_b).max() <= 1
    assert len({overlay.tobytes() for _, overlay in alone}) == len(files)


SERVER_CONCURRENCY, SERVER_MAX_QUEUE = 2, 6  # at most 8 requests admitted at once


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`imagenet-resnet serve` on a free port, with the examples it finds in the model's validation data."""
    port, log = free_port(), tmp_path_factory.mktemp("server") / "serve.log"
    process, url = start_server([sys.executable, "-m", "imagenet_resnet", "serve", "--checkpoint", str(checkpoint),
                                 "--port", str(port), "--device", "cpu", "--concurrency", str(SERVER_CONCURRENCY),
                                 "--max-queue", str(SERVER_MAX_QUEUE)], port, log)
    yield url
    stop(process)
    assert f"running on http://127.0.0.1:{port}" in log.read_text()  # localhost unless told otherwise


@needs_gradio
def test_json_endpoint_classifies_odd_images_and_refuses_bad_ones_clearly(server, checkpoint, tiny_data):
    import httpx

    for name, data in odd_images().items():
        answer = httpx.post(f"{server}/api/classify", content=data, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["top"]) == 5, (name, answer.text)
    for name, (data, status, words) in bad_inputs().items():
        answer = httpx.post(f"{server}/api/classify", content=data, timeout=30)
        assert answer.status_code == status and words in answer.json()["error"], (name, answer.text)
    answer = httpx.post(f"{server}/api/classify", content=b"\xff\xd8" + bytes(MAX_UPLOAD_BYTES), timeout=30)
    assert answer.status_code == 413 and "over the 20 MiB limit" in answer.json()["error"]
    answer = httpx.post(f"{server}/api/classify", files={"image": ("a.jpg", b"\xff\xd8 not quite")}, timeout=30)
    assert answer.status_code == 415 and "--data-binary" in answer.json()["error"]  # a form: say how to send it

    # Still answering, and as `predict` does.
    image = next((tiny_data / "val").glob("*/*"))
    answer = httpx.post(f"{server}/api/classify", content=image.read_bytes(), timeout=30).json()["top"]
    expected = json.loads(run_cli("predict", "--checkpoint", str(checkpoint), "--json", "--device", "cpu",
                                  str(image)).stdout)[0]["top"]
    assert answer == expected
    assert httpx.get(f"{server}/api/health", timeout=10).json()["model"]["num_classes"] == 10


@needs_gradio
def test_a_full_queue_answers_busy_and_the_server_carries_on(server):
    import httpx

    jpeg = encode(colourful(640, 480), "JPEG")

    async def slow_upload():  # holds its place in the queue while the body trickles in
        yield jpeg[:1000]
        await asyncio.sleep(1.5)
        yield jpeg[1000:]

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            admitted = [asyncio.create_task(client.post("/api/classify", content=slow_upload()))
                        for _ in range(SERVER_CONCURRENCY + SERVER_MAX_QUEUE)]
            await asyncio.sleep(0.7)
            refused = await client.post("/api/classify", content=jpeg)
            return refused, await asyncio.gather(*admitted), await client.post("/api/classify", content=jpeg)

    refused, admitted, later = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.json()["error"].startswith("server busy")
    assert refused.headers["retry-after"]
    assert [a.status_code for a in admitted] == [200] * len(admitted) and later.status_code == 200


@needs_gradio
def test_page_api_gives_the_same_clear_messages(server, tmp_path):
    import httpx
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server + "/", verbose=False)
    for name, (data, _, words) in bad_inputs().items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AppError, match=re.escape(words)):
            client.predict(handle_file(str(tmp_path / name)), api_name="/classify")
    upload = httpx.post(f"{server}/gradio_api/upload", files={"files": ("big.jpg", bytes(MAX_UPLOAD_BYTES + 1))},
                        timeout=60)
    assert upload.status_code == 413
    (tmp_path / "cmyk.jpg").write_bytes(odd_images()["cmyk.jpg"])
    label, overlay = client.predict(handle_file(str(tmp_path / "cmyk.jpg")), api_name="/classify")
    assert len(label["confidences"]) == 5 and Image.open(overlay).size == (320, 320)

    # A request naming a file on the server that nobody uploaded must not get it read.
    call = f"{server}/gradio_api/call/classify"
    not_uploaded = {"path": str(tmp_path / "cmyk.jpg"), "meta": {"_type": "gradio.FileData"}}
    event = httpx.post(call, json={"data": [not_uploaded]}, timeout=30).json()["event_id"]
    outcome = httpx.get(f"{call}/{event}", timeout=30).text
    assert outcome.startswith("event: error") and "confidences" not in outcome


@needs_gradio
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None or not Path(CHROMIUM).exists(),
                    reason="needs playwright (pip) and Chromium (apt-get install chromium)")
def test_browser_uploads_an_image_and_sees_top5_and_grad_cam(server, checkpoint, tiny_data, tmp_path):
    import httpx
    from playwright.sync_api import expect, sync_playwright

    def top5(file: Path) -> list[dict]:
        return httpx.post(f"{server}/api/classify", content=file.read_bytes(), timeout=30).json()["top"]

    first_example = example_images(load_model(checkpoint, "cpu"), tmp_path / "examples")[0]  # as the server chose
    image = sorted((tiny_data / "val").glob("star/*"))[0]
    expected = top5(image)
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server, timeout=60_000)
            expect(page.get_by_text("Model card")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("10: checkerboard, circle")).to_be_visible()
            heading = page.locator("#top-classes [data-testid=label-output-value]")

            page.locator(".gallery-item").first.click()
            expect(heading).to_have_text(top5(first_example)[0]["name"], timeout=30_000)

            page.locator("#image input[type=file]").set_input_files(image)
            expect(heading).to_have_text(expected[0]["name"], timeout=30_000)
            names = page.locator("#top-classes dt").all_inner_texts()
            shares = page.locator("#top-classes dd").all_inner_texts()
            assert names == [t["name"] for t in expected]
            assert shares == [f"{round(t['probability'] * 100)}%" for t in expected]
            overlay = page.locator("#grad-cam img")
            expect(overlay).to_be_visible()
            page.wait_for_function("document.querySelector('#grad-cam img').naturalWidth === 320")
            screenshot = tmp_path / "serve-page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"\nscreenshot of the page: {screenshot}")

            page.locator("#image input[type=file]").set_input_files(tmp_path / "notes.png")
            expect(page.get_by_test_id("toast-text")).to_have_text(
                "not a readable image: use a JPEG, PNG, WebP, GIF, BMP or TIFF file", timeout=30_000)
        finally:
            browser.close()
    assert Image.open(screenshot).size[0] == 1280


@needs_gradio
def test_load_of_good_and_bad_requests_gives_no_server_error(server, tmp_path):
    record = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "load_serve.py"), "--url", server,
                           "--requests", "80", "--concurrency", "8", "--json", str(record)],
                          capture_output=True, text=True, timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(record.read_text())
    assert result["requests"] == 80 and result["bad"] == 16 and result["refused_4xx"] == 16
    assert result["server_errors"] == 0 and result["wrong_answers"] == 0 and result["server_answers_afterwards"]
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert result["command"].startswith("python ") and result["environment"]["gradio"]


@needs_gradio
def test_space_folder_runs_with_python_app_py(checkpoint, tmp_path):
    import httpx

    space = tmp_path / "space"
    summary = json.loads(run_cli("export", "--checkpoint", str(checkpoint), "--format", "space",
                                 "--out", str(space)).stdout)
    assert summary["examples"] and all(Path(e).parent == space / "examples" for e in summary["examples"])
    front_matter = yaml.safe_load((space / "README.md").read_text().split("---")[1])
    assert front_matter["sdk"] == "gradio" and front_matter["app_file"] == "app.py"
    assert front_matter["sdk_version"] and front_matter["title"] and front_matter["license"]
    assert f"gradio=={front_matter['sdk_version']}" in (space / "requirements.txt").read_text().split()
    assert (space / "model.safetensors").exists() and (space / "model.json").exists()
    assert (space / "imagenet_resnet" / "data" / "imagenet_classes.tsv").exists()
    assert not list(space.rglob("__pycache__"))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRADIO_SERVER_NAME")}
    imported = subprocess.run([sys.executable, "-c", "import imagenet_resnet; print(imagenet_resnet.__file__)"],
                              cwd=space, env=env, capture_output=True, text=True, check=True).stdout
    assert Path(imported.strip()).parent == space / "imagenet_resnet"  # the copy, not the installed package
    port = free_port()
    process, url = start_server([sys.executable, "app.py"], port, tmp_path / "app.log", cwd=space,
                                env={**env, "GRADIO_SERVER_PORT": str(port)})
    try:
        example = Path(summary["examples"][0])
        answer = httpx.post(f"{url}/api/classify", content=example.read_bytes(), timeout=30)
        assert answer.status_code == 200 and len(answer.json()["top"]) == 5
        page = httpx.get(url + "/", timeout=30)
        assert page.status_code == 200 and "gradio" in page.text.lower()
    finally:
        stop(process)


def test_a_port_in_use_is_said_in_one_line_with_a_free_one(checkpoint):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", "--checkpoint", str(checkpoint), "--port", str(port), "--device", "cpu", check=False,
                       timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"port {port} on 127.0.0.1 is taken" in proc.stderr and "--port " in proc.stderr


@needs_gradio
def test_gradio_analytics_are_off_by_default(checkpoint, monkeypatch):
    from imagenet_resnet.serving.serve import build_app

    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    build_app(load_model(checkpoint, "cpu"))
    import gradio

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert not gradio.Blocks().analytics_enabled


@needs_gradio
def test_a_cpu_space_installs_the_cpu_only_torch(checkpoint, tmp_path):
    """Issue 14: `torch>=2.1` from PyPI is the CUDA build on Linux, 5.7 GB for a CPU demo. Issue 36: a CPU Space
    (a paid account's since July 2026) is asked for with --hardware cpu."""
    from imagenet_resnet.serving.space import CPU_TORCH_INDEX

    summary = json.loads(run_cli("export", "--checkpoint", str(checkpoint), "--format", "space", "--hardware", "cpu",
                                 "--out", str(tmp_path / "space")).stdout)
    lines = (tmp_path / "space" / "requirements.txt").read_text().split("\n")
    assert lines[0] == f"--extra-index-url {CPU_TORCH_INDEX}"
    assert [line for line in lines if line.startswith("torch")] == [f"torch=={torch.__version__.split('+')[0]}+cpu"]
    front_matter = yaml.safe_load((tmp_path / "space" / "README.md").read_text().split("---")[1])
    assert front_matter["suggested_hardware"] == summary["hardware"] == "cpu-basic"
    assert front_matter["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"


@needs_gradio
def test_a_space_is_made_for_zero_gpu_by_default(checkpoint, tmp_path):
    """Issue 36: since July 2026 a free account's Gradio Space runs on ZeroGPU only, which runs the Gradio, PyTorch
    and Python versions its doc lists (space.py holds that list) and needs PyTorch's CUDA build."""
    from imagenet_resnet.serving.space import ZERO_GPU_GRADIO_MAJOR, ZERO_GPU_PYTHON, ZERO_GPU_TORCH

    space = tmp_path / "space"
    summary = json.loads(run_cli("export", "--checkpoint", str(checkpoint), "--format", "space",
                                 "--out", str(space)).stdout)
    front_matter = yaml.safe_load((space / "README.md").read_text().split("---")[1])
    assert front_matter["suggested_hardware"] == summary["hardware"] == "zero-a10g"
    assert front_matter["python_version"] == ZERO_GPU_PYTHON
    assert int(front_matter["sdk_version"].split(".")[0]) >= ZERO_GPU_GRADIO_MAJOR
    lines = (space / "requirements.txt").read_text().split()
    torch_pins = [line for line in lines if line.startswith("torch")]
    assert len(torch_pins) == 1 and torch_pins[0].removeprefix("torch==") in ZERO_GPU_TORCH
    assert not any(line.startswith("--") for line in lines)  # PyPI's index alone: its torch is the CUDA build
    assert f"spaces=={importlib.metadata.version('spaces')}" in lines


@needs_gradio
def test_the_space_runs_the_model_under_spaces_gpu(checkpoint, tmp_path, monkeypatch):
    """Issue 36: ZeroGPU lends a GPU only to a function decorated with @spaces.GPU (a Space with none does not
    start): app.py hands the model's work on each image to spaces.GPU, and a request runs through what it gives back.
    spaces.GPU here is the real one, watched: outside ZeroGPU it returns the function unchanged."""
    import spaces
    from starlette.testclient import TestClient

    space = tmp_path / "space"
    summary = json.loads(run_cli("export", "--checkpoint", str(checkpoint), "--format", "space",
                                 "--out", str(space)).stdout)
    wrapped, calls, real_gpu = [], [], spaces.GPU

    def watched_gpu(*args, **options):
        decorate = real_gpu(*args, **options)

        def watched_decorate(task):
            wrapped.append((task.__name__, options))
            on_gpu = decorate(task)

            def counted(*call_args):
                calls.append(task.__name__)
                return on_gpu(*call_args)
            return counted
        return watched_decorate

    monkeypatch.setattr(spaces, "GPU", watched_gpu)
    app_module = runpy.run_path(str(space / "app.py"))  # imported, not run as __main__: no server
    assert [name for name, _ in wrapped] == ["model_outputs"]
    assert wrapped[0][1] == {"duration": app_module["GPU_SECONDS"]}
    answer = TestClient(app_module["app"]).post("/api/classify", content=Path(summary["examples"][0]).read_bytes())
    assert answer.status_code == 200 and len(answer.json()["top"]) == 5
    assert calls == ["model_outputs"]
