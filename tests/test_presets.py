import io

import numpy as np
import pytest
from PIL import Image

from imagenet_resnet.data import presets
from imagenet_resnet.data.presets import EvalPreset, TrainPreset, random_resized_crop_box


def _encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _jpeg(width, height, mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels).convert(mode))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_train_preset_shape_dtype_and_modes(mode):
    out = TrainPreset(size=96, jitter=0.4)(_jpeg(500, 375, mode), np.random.default_rng(0))
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8


def test_png_with_alpha_and_palette():
    for mode in ("RGBA", "P", "I;16"):
        out = EvalPreset(size=32)(_encode(Image.new(mode, (80, 60)), "PNG"))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_train_preset_is_deterministic_under_a_seed():
    preset = TrainPreset(size=64, jitter=0.3)
    a = preset(_jpeg(320, 240), np.random.default_rng(7))
    b = preset(_jpeg(320, 240), np.random.default_rng(7))
    c = preset(_jpeg(320, 240), np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        x0, y0, x1, y1 = random_resized_crop_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        w, h = x1 - x0, y1 - y0
        assert 0 <= x0 < x1 <= 500 and 0 <= y0 < y1 <= 375
        assert 0.07 * 500 * 375 <= w * h <= 500 * 375
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_crop_box_falls_back_to_centre_for_extreme_aspect():
    # A 1000x10 strip: no crop of ratio in [3/4, 4/3] and half the area fits, so the centre 13x10 is taken.
    box = random_resized_crop_box(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    assert box == (493, 0, 506, 10)


def test_eval_preset_takes_the_centre():
    # Left half black, right half white, with a red square in the middle.
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[:, 200:] = 255
    pixels[130:170, 180:220] = (255, 0, 0)
    out = EvalPreset(size=100, crop_ratio=0.875)(_encode(Image.fromarray(pixels), "PNG"))
    assert out.shape == (100, 100, 3)
    assert tuple(out[50, 50]) == pytest.approx((255, 0, 0), abs=30)
    # The centre crop is 262.5 px of the 400 wide image: still both halves, split down the middle.
    assert out[5, 5].max() < 30 and out[5, 94].min() > 225


def test_flip_happens_about_half_the_time():
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :32] = 255  # bright left half
    preset = TrainPreset(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    png = _encode(Image.fromarray(pixels), "PNG")
    flipped = sum(preset(png, np.random.default_rng(s))[:, 0].mean() < 128 for s in range(200))
    assert 70 < flipped < 130


def test_reduced_size_decode_is_used_for_large_jpegs_and_matches_a_full_decode(monkeypatch):
    # A smooth 2000x1600 image: the centre crop is 1400 px, so a 1/4-size decode still gives >= 224 px.
    y, x = np.mgrid[0:1600, 0:2000]
    pixels = np.stack([x % 256, y % 256, (x + y) // 16 % 256], axis=-1).astype(np.uint8)
    data = _encode(Image.fromarray(pixels))
    decoded_shapes = []
    real_decode = presets._decode
    monkeypatch.setattr(presets, "_decode", lambda *a: decoded_shapes.append(real_decode(*a).shape) or real_decode(*a))
    out = EvalPreset(size=224)(data)
    assert out.shape == (224, 224, 3)
    assert decoded_shapes == [(400, 500, 3)]  # libjpeg-turbo decoded at 1/4 scale
    monkeypatch.setattr(presets, "_scale_factor", lambda *a: 1)
    full = EvalPreset(size=224)(data)
    assert np.abs(out.astype(int) - full.astype(int)).mean() < 6


def test_cmyk_and_png_named_jpeg_decode_like_rgb():
    rgb = Image.fromarray(np.full((60, 80, 3), (200, 40, 40), np.uint8))
    for data in (_encode(rgb.convert("CMYK")), _encode(rgb, "PNG")):
        out = EvalPreset(size=32)(data)
        assert out.shape == (32, 32, 3)
        assert np.abs(out.reshape(-1, 3).mean(0) - (200, 40, 40)).max() < 12


def test_colour_jitter_changes_pixels_and_saturates_at_the_range_ends():
    img = _jpeg(200, 200)
    plain = TrainPreset(size=64)(img, np.random.default_rng(1))
    jittered = TrainPreset(size=64, jitter=0.4)(_jpeg(200, 200), np.random.default_rng(1))
    assert not np.array_equal(plain, jittered)
    # Brightened past 255, a near-white image stays white: clipped, not wrapped round to dark (uint8 arithmetic).
    bright = np.full((8, 8, 3), 250, np.uint8)
    outs = [presets.color_jitter(bright, 0.4, np.random.default_rng(seed)) for seed in range(10)]
    assert any((out == 255).all() for out in outs)  # some draws brighten it past the top of the range
    assert all(out.dtype == np.uint8 and out.min() >= 150 for out in outs)  # darkened at most to 0.6 x 250


def _smooth_jpeg(width=400, height=300) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    return _encode(Image.fromarray(pixels.astype(np.uint8)))


@pytest.mark.parametrize("pipeline", ["full-decode", "reference"])
def test_every_pipeline_takes_the_fast_presets_crop_and_flip(pipeline):
    """Same seed, same crop box and flip: the pipelines differ only in how the pixels are made."""
    data = _smooth_jpeg()
    fast = presets.make_train_preset("fast", 64, (0.08, 1.0), (3 / 4, 4 / 3))
    other = presets.make_train_preset(pipeline, 64, (0.08, 1.0), (3 / 4, 4 / 3))
    for seed in range(20):
        a = fast(data, np.random.default_rng(seed)).astype(int)
        b = other(data, np.random.default_rng(seed)).astype(int)
        c = other(data, np.random.default_rng(seed + 100)).astype(int)
        assert np.abs(a - b).mean() < 3, seed  # rounding and resampling only
        assert np.abs(a - c).mean() > np.abs(a - b).mean()  # another seed: another crop


@pytest.mark.parametrize("pipeline", ["full-decode", "reference"])
def test_every_pipeline_evaluates_the_same_centre(pipeline):
    data = _smooth_jpeg()
    fast = presets.make_eval_preset("fast", 100, 0.875)(data).astype(int)
    other = presets.make_eval_preset(pipeline, 100, 0.875)(data).astype(int)
    assert other.shape == (100, 100, 3)
    assert np.abs(fast - other).mean() < 2


def test_full_decode_never_decodes_at_reduced_size(monkeypatch):
    data = _smooth_jpeg(2000, 1600)
    factors = []
    real_decode = presets._decode
    monkeypatch.setattr(presets, "_decode", lambda data, w, h, factor, fast: factors.append((factor, fast))
                        or real_decode(data, w, h, factor, fast))
    presets.make_eval_preset("full-decode", 224, 0.875)(data)
    presets.make_train_preset("full-decode", 224, (0.08, 1.0), (3 / 4, 4 / 3))(data, np.random.default_rng(0))
    presets.make_eval_preset("fast", 224, 0.875)(data)
    assert factors == [(1, False), (1, False), (4, False)]


def test_reference_eval_resizes_the_short_side_then_crops_the_centre():
    # torchvision: Resize(round(100 / 0.875) = 114) makes 400x300 into 152x114; CenterCrop(100) takes x 26..126.
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[:, 200:] = 255
    out = presets.make_eval_preset("reference", 100, 0.875)(_encode(Image.fromarray(pixels), "PNG"))
    assert out.shape == (100, 100, 3)
    assert out[50, :48].max() < 10 and out[50, 52:].min() > 245  # the edge at 76 - 26 = 50


def test_reference_pipeline_written_with_pil_equals_torchvisions(monkeypatch):
    """Where torchvision imports: our PIL transcription gives exactly torchvision's pixels."""
    if presets.torchvision_functional() is None:
        pytest.skip("torchvision does not import here")
    data = _jpeg(333, 250)
    train = presets.make_train_preset("reference", 64, (0.08, 1.0), (3 / 4, 4 / 3))
    evaluate = presets.make_eval_preset("reference", 64, 0.875)
    with_torchvision = [train(data, np.random.default_rng(s)) for s in range(10)] + [evaluate(data)]
    monkeypatch.setattr(presets, "torchvision_functional", lambda: None)
    with_pil = [train(data, np.random.default_rng(s)) for s in range(10)] + [evaluate(data)]
    for a, b in zip(with_torchvision, with_pil):
        assert np.array_equal(a, b)
