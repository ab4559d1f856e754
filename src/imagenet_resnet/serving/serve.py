"""`imagenet-resnet serve`: a web page and a JSON endpoint that classify uploaded images with a trained model.

The page (Gradio) shows the top-5 classes, a Grad-CAM overlay and the model card. `POST /api/classify` takes
an image's bytes as the request body and answers the top-5 as JSON, for callers behind their own service.

Every upload is decoded by `images.safe_open_image`, not by Gradio: bounded in bytes and pixels, any mode
turned into RGB, or a one-line message saying what is wrong. Model
work runs `concurrency` requests at a time and at most `max_queue` more wait; beyond that a request is told
the server is busy, so memory stays bounded under any load.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations at runtime, and
# `Request` is imported inside _json_api (Gradio and FastAPI are optional).
import asyncio
import errno
import math
import os
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prepared import open_split
from ..data.presets import EvalPreset
from ..data.untrusted_images import MAX_PIXELS
from ..errors import UserError
from .card import describe_source
from .gradcam import cam_layer, heat_maps
from .images import (MAX_UPLOAD_BYTES, ImageRejected, read_image_bytes, safe_open_image,  # noqa: F401
                     too_large)  # (ImageRejected, safe_open_image: re-exported for the tests)
from .inference import LoadedModel, top_k_records

OVERLAY_SIDE = 320  # the Grad-CAM overlay's side in pixels, whatever the model's input size


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (blue, cyan, yellow, red) of values in [0, 1], as floats in [0, 1]: HxW -> HxWx3."""
    return np.clip(1.5 - np.abs(4 * values[..., None] - np.array([3.0, 2.0, 1.0])), 0, 1)


class Classifier:
    """Top-k classes and a Grad-CAM overlay for uploads, thread-safe, at most `concurrency` at a time.
    `layer`: the module Grad-CAM looks at (default: cam_layer of the model's input size); at a ResNet's last
    stage the map is computed as CAM, the same map without a backward pass (gradcam.heat_maps)."""

    def __init__(self, loaded: LoadedModel, concurrency: int = 2, layer: str | None = None, top_k: int = 5,
                 model_work_wrapper: Callable[[Callable], Callable] | None = None):
        self.loaded, self.top_k = loaded, min(top_k, len(loaded.classes))
        self.preset = loaded.preset()
        self.layer = layer or cam_layer(self.preset.size)
        try:  # a wrong name fails now, not at the first request
            loaded.model.get_submodule(self.layer)
        except AttributeError:
            raise UserError(f"layer {self.layer!r}: no such module in the model; name one such as layer4, "
                             f"layer3.1 or layer4.1.conv2") from None
        self.overlay_preset = EvalPreset(max(OVERLAY_SIDE, self.preset.size), self.preset.crop_ratio)
        # Enough pixels for the larger of the model input and the overlay, before the centre crop.
        self.decode_side = math.ceil(self.overlay_preset.size / self.preset.crop_ratio)
        self.slots = threading.BoundedSemaphore(concurrency)
        repeated = {name for name, count in Counter(loaded.names).items() if count > 1}  # ImageNet has two "crane"s
        self.labels = [f"{name} ({cls})" if name in repeated else name
                       for name, cls in zip(loaded.names, loaded.classes)]
        # A ZeroGPU Space wraps the model's work in @spaces.GPU, which runs it in a forked process lent a GPU for the
        # call: so it takes and gives back arrays and tensors (they cross between the processes) and takes no lock.
        self.run_model = self.model_outputs if model_work_wrapper is None else model_work_wrapper(self.model_outputs)

    def __call__(self, source: bytes | str | Path, explain: bool = False) -> tuple[list[dict], np.ndarray | None]:
        """The top-k (class, name, probability) and, with `explain`, the Grad-CAM overlay of the top class."""
        with self.slots:
            data = read_image_bytes(source)
            probs, cam = self.run_model(self.loaded.input_pixels(data), explain)
            ranked = top_k_records(probs, self.loaded.classes, self.labels, self.top_k)[0]
            if not explain:
                return ranked, None
            # The overlay only shows where the evidence lies: a larger picture of the same centre crop.
            return ranked, self._overlay(self.overlay_preset.from_pixels(safe_open_image(data, self.decode_side)), cam)

    def model_outputs(self, pixels: np.ndarray, explain: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's work on one image's input pixels (HxWx3 uint8): the class probabilities (1, K) and, with
        `explain`, the Grad-CAM map of the top class (1, h, w), both on the CPU."""
        images = self.loaded.normalize(torch.from_numpy(pixels[None]))
        if explain:  # one forward pass gives both the probabilities and the map
            logits, cam = heat_maps(self.loaded.model, images, self.layer)
        else:
            with torch.no_grad():
                logits = self.loaded.model(images)
        return logits.float().softmax(1).cpu(), cam.cpu() if explain else None

    @staticmethod
    def _overlay(pixels: np.ndarray, cam: torch.Tensor) -> np.ndarray:
        side = pixels.shape[0]
        cam = F.interpolate(cam[:, None].float().cpu(), size=(side, side), mode="bilinear", align_corners=False)
        heat = jet(cam[0, 0].clamp(0, 1).numpy()) * 255
        return (0.55 * pixels + 0.45 * heat).round().astype(np.uint8)


def example_images(loaded: LoadedModel, out: Path, limit: int = 8) -> list[Path]:
    """One validation image for each of the first `limit` classes, copied from the data the model was trained
    on into `out`; none when that data is not on this machine."""
    try:
        index = open_split(loaded.cfg.data.path, "val", classes=loaded.classes)
    except (OSError, ValueError):
        return []
    out.mkdir(parents=True, exist_ok=True)
    first_of_class = {}
    for i, label in enumerate(index.labels.tolist()):
        first_of_class.setdefault(label, i)
    files = []
    for label, i in sorted(first_of_class.items())[:limit]:
        try:
            data = index.read(i)
        except OSError:
            continue
        name = "".join(c if c.isalnum() else "_" for c in loaded.names[label])[:40]
        suffix = ".png" if data.startswith(b"\x89PNG") else ".jpg"  # a packed copy holds only JPEGs
        file = out / f"{len(files):02d}_{name}{suffix}"
        file.write_bytes(data)
        files.append(file)
    return files


MARKDOWN_SPECIAL = frozenset("\\`*_[]<>&|!:~#")  # what makes Markdown (or HTML) of text, with ':' for bare links


def markdown_text(text: str) -> str:
    """`text` shown as itself in Markdown: never a link, an image, HTML or formatting. Class names and a card's
    entries come from the checkpoint, which anyone can hand over, and the page shows them to every visitor."""
    return "".join("\\" + c if c in MARKDOWN_SPECIAL else c if c.isprintable() else " " for c in text)


def model_card_markdown(loaded: LoadedModel) -> str:
    # `data` is shown in a code span, where escapes would show: describe_source keeps it in one.
    card = {k: markdown_text(v) if isinstance(v, str) and k != "data" else v for k, v in loaded.card.items()}

    def share(value: float | None) -> str:
        return f"{value:.1%}" if value is not None else "not recorded"

    names = ", ".join(map(markdown_text, loaded.names[:20])) + (
        f", ... ({len(loaded.names) - 20} more)" if len(loaded.names) > 20 else "")
    epochs = card.get("epochs_trained")
    val_images = f"{card['val_images']:,} validation images" if card.get("val_images") else "validation images"
    return "\n".join([
        "### Model card",
        f"- **architecture**: {card['architecture']}{' with BlurPool' if card.get('blurpool') else ''}, "
        f"{card['parameters'] / 1e6:.2f} M parameters",
        f"- **classes**: {card['num_classes']}: {names}",
        f"- **weights**: {card.get('weights', 'raw')}",
        f"- **data**: trained and validated on {describe_source(card)}",
        f"- **validation accuracy**: top-1 {share(card.get('val_top1'))}, top-5 {share(card.get('val_top5'))}, "
        f"on {val_images} of that data",
        f"- **epochs**: {epochs if epochs is not None else '?'} of {card.get('epochs_planned')}",
        f"- **trained**: {card.get('trained_at') or 'not recorded'}",
        f"- **input**: the centre crop, resized to {card['eval_size']} x {card['eval_size']} px",
        f"- **limitations**: {card.get('limitations') or 'not recorded (an export made before model cards had them)'}",
    ])


def build_app(loaded: LoadedModel, examples: list[Path] | None = None, concurrency: int = 2, max_queue: int = 32,
              layer: str | None = None, model_work_wrapper: Callable[[Callable], Callable] | None = None):
    """The FastAPI app: the Gradio page at /, POST /api/classify, GET /api/health. Serve it with `run_server`.
    Gradio's usage analytics stay off unless GRADIO_ANALYTICS_ENABLED says otherwise. `model_work_wrapper`: a
    decorator for the model's work on each image (Classifier.model_outputs), as a Space's spaces.GPU(...)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read by Gradio as it is imported
    import gradio as gr  # optional: `serve` checks it is installed first

    classifier = Classifier(loaded, concurrency, layer, model_work_wrapper=model_work_wrapper)
    page = _page(classifier, loaded, examples)
    page.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    app = gr.mount_gradio_app(_json_api(classifier, loaded, concurrency, max_queue), page, path="/",
                              max_file_size=MAX_UPLOAD_BYTES, show_error=False, footer_links=["api", "gradio"])
    # Gradio checks that a file path a request names was uploaded to it only once `has_launched` is set, which
    # launch() does and mount_gradio_app does not: without it any API caller could have a server file read.
    page.has_launched = True
    return app


def _page(classifier: Classifier, loaded: LoadedModel, examples: list[Path] | None):
    """The Gradio page: upload or example, top-k bars, Grad-CAM overlay, model card."""
    import gradio as gr

    def classify_upload(payload: dict[str, Any] | None):
        if payload is None:  # the image was cleared
            return None, None
        try:
            ranked, overlay = classifier(payload["path"], explain=True)
        except (ImageRejected, FileNotFoundError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        return {r["name"]: r["probability"] for r in ranked}, overlay

    title = f"{markdown_text(loaded.card['architecture'])}, {loaded.card['num_classes']} classes"
    with gr.Blocks(title=f"imagenet-resnet: {title}", delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"## imagenet-resnet: {title}\nUpload an image (up to {MAX_UPLOAD_BYTES // 2**20} MiB and "
                    f"{MAX_PIXELS // 10**6} megapixels) or pick an example: the model's top-5 classes, and where in "
                    f"the image the evidence for the first one lies (Grad-CAM, on the centre crop the model sees).")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image",
                                 height=360, elem_id="image")
                gallery = gr.Examples([[str(file)] for file in examples], inputs=image) if examples else None
            with gr.Column():
                top5 = gr.Label(num_top_classes=classifier.top_k, label=f"Top-{classifier.top_k}",
                                elem_id="top-classes")
                overlay = gr.Image(label=f"Grad-CAM ({classifier.layer}) for the top class", interactive=False,
                                   format="png", height=360, elem_id="grad-cam")
        gr.Markdown(model_card_markdown(loaded))
        # preprocess=False: the upload reaches classify_upload as the file Gradio stored, undecoded. Not on
        # `change`, which the page fires twice when one image replaces another.
        classify = {"fn": classify_upload, "inputs": image, "outputs": [top5, overlay], "preprocess": False}
        image.upload(**classify, api_name="classify")
        if gallery is not None:
            gallery.load_input_event.then(**classify, api_visibility="private")
        image.clear(lambda: (None, None), outputs=[top5, overlay], queue=False, api_visibility="private")
    return page


def _json_api(classifier: Classifier, loaded: LoadedModel, concurrency: int, max_queue: int):
    """GET /api/health and POST /api/classify (the image's bytes as the body), with their own bounded queue."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    json_slots, admitted = asyncio.Semaphore(concurrency), [0]

    @api.get("/api/health")
    def health() -> dict:
        return {"status": "ok", "model": loaded.card}

    @api.get("/api/classify")
    def classify_needs_post() -> JSONResponse:  # else the page mounted at / answers a bare 404
        return JSONResponse({"error": "POST the image's bytes as the request body, e.g. curl --data-binary "
                                      "@photo.jpg URL/api/classify"}, status_code=405, headers={"Allow": "POST"})

    @api.post("/api/classify")
    async def classify_bytes(request: Request):
        if admitted[0] >= concurrency + max_queue:
            return JSONResponse({"error": f"server busy: {admitted[0]} requests in progress or queued; retry in a "
                                          f"few seconds"}, status_code=503, headers={"Retry-After": "2"})
        admitted[0] += 1
        try:
            data = await _read_body(request)
            async with json_slots:
                ranked, _ = await run_in_threadpool(classifier, data)
        except ImageRejected as e:
            message = str(e)
            if request.headers.get("content-type", "").startswith("multipart/"):
                message += " (send the image's bytes as the request body, e.g. curl --data-binary @photo.jpg)"
            return JSONResponse({"error": message}, status_code=e.status)
        except ClientDisconnect:  # the caller went away mid-upload: nobody to answer
            return JSONResponse({"error": "the upload was interrupted"}, status_code=400)
        finally:
            admitted[0] -= 1
        return {"top": ranked}

    return api


# A request holds its place in the bounded queue while its body arrives: a client sending a byte a second (or
# nothing) would hold it for good, and a few such clients would keep the server busy for everyone. The body must
# start within UPLOAD_GRACE_SECONDS and keep coming at UPLOAD_MIN_RATE on average (a 20 MiB photo: 22 minutes);
# else the request ends with 408.
UPLOAD_GRACE_SECONDS = 5.0
UPLOAD_MIN_RATE = 16 << 10  # bytes per second


async def _read_body(request) -> bytes:
    """The request body, refused as soon as it is known to exceed MAX_UPLOAD_BYTES, or once it comes slower than
    UPLOAD_MIN_RATE after UPLOAD_GRACE_SECONDS."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise too_large(int(declared))
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    started, stream = loop.time(), request.stream()
    while True:
        allowed = started + UPLOAD_GRACE_SECONDS + size / UPLOAD_MIN_RATE - loop.time()
        try:
            chunk = await asyncio.wait_for(anext(stream), max(allowed, 0.0))
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise ImageRejected(f"the upload came too slowly ({size:,} bytes in {loop.time() - started:.0f} s; the "
                                f"server waits {UPLOAD_GRACE_SECONDS:g} s, then needs {UPLOAD_MIN_RATE >> 10} KiB/s)",
                                408) from None
        size += len(chunk)
        if size > MAX_UPLOAD_BYTES:
            raise too_large(size)
        chunks.append(chunk)


def port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no bar
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def check_port(host: str, port: int) -> None:
    """A port in use is said in one line with a free one to use, before the model loads."""
    if port_taken(host, port):
        free = next((p for p in range(port + 1, port + 50) if not port_taken(host, p)), None)
        raise UserError(f"port {port} on {host} is taken (another server, or an earlier `serve` still running)"
                        + (f": pick another with --port {free}" if free else ": pick another with --port"))


def run_server(app, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn  # with Gradio, optional

    print("the page at /, JSON at POST /api/classify (the image's bytes as the body) and GET /api/health",
          flush=True)
    uvicorn.run(app, host=host, port=port, access_log=False, timeout_graceful_shutdown=5)
