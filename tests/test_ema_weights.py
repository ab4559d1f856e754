"""--ema: evaluate, predict, export and the model card with a checkpoint's exponential moving average of the
weights (train.ema_decay) instead of its raw weights."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, train_tiny
from imagenet_resnet import cli
from imagenet_resnet.errors import UserError
from imagenet_resnet.evaluation.command import evaluate_checkpoint
from imagenet_resnet.models import build_model
from imagenet_resnet.serving import export
from imagenet_resnet.serving.inference import image_sources, load_model, predict


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    """One tiny run with EMA, shared by every test here. Decay 0.5 so that the average moves within 2 epochs
    yet differs from the last step's weights."""
    out = tmp_path_factory.mktemp("ema") / "run"
    train_tiny(tiny_data, out, "train.ema_decay=0.5", epochs=2)
    return out


@pytest.fixture(scope="module")
def final_record(run):
    """The last epoch's record in metrics.jsonl: what the run itself measured, raw and EMA weights."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in records if "val_top1_ema" in r]
    assert epochs, "the run recorded no EMA accuracy"
    return epochs[-1]


@pytest.fixture(scope="module")
def images(tiny_data):
    """Six validation images, of several classes, as `predict` takes them."""
    files = sorted((tiny_data / "val").rglob("*.jpg"))[::3][:6]
    assert len(files) == 6
    return image_sources([str(path) for path in files])


def _stored(run):
    """The run's last.pt as saved, read without any code of ours."""
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)


def _assert_weights_equal(model, weights):
    state = model.state_dict()
    assert state.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name


def _rewritten(run, tmp_path, name, change):
    """A copy of the run's last.pt with `change` applied to its contents (torch.save writes fresh checksums)."""
    saved = _stored(run)
    change(saved)
    path = tmp_path / name
    torch.save(saved, path)
    return path


def test_evaluate_with_ema_reports_the_runs_own_ema_accuracy(run, tiny_data, final_record, capsys):
    assert cli.main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data", str(tiny_data), "--device", "cpu",
                     "--workers", "0", "--ema", "--json"]) == 0
    averaged = json.loads(capsys.readouterr().out)
    raw = evaluate_checkpoint(run / "last.pt", tiny_data, workers=0, device="cpu")
    assert (averaged["top1"], averaged["top5"]) == (final_record["val_top1_ema"], final_record["val_top5_ema"])
    # the losses too: top-1 alone could match by chance, the losses of the two sets of weights do not
    assert averaged["loss"] == pytest.approx(final_record["val_loss_ema"], rel=1e-6)
    assert (raw["top1"], raw["top5"]) == (final_record["val_top1"], final_record["val_top5"])
    assert raw["loss"] == pytest.approx(final_record["val_loss"], rel=1e-6)
    assert averaged["weights"].startswith("EMA (decay 0.5, ") and raw["weights"] == "raw"

    assert cli.main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data", str(tiny_data), "--device", "cpu",
                     "--workers", "0", "--ema"]) == 0
    assert "weights     EMA (decay 0.5, " in capsys.readouterr().out  # the table says which weights too


def test_predict_with_ema_gives_the_ema_weights_probabilities(run, images):
    raw, averaged = load_model(run / "last.pt", "cpu"), load_model(run / "last.pt", "cpu", ema=True)
    assert (raw.ema, averaged.ema) == (False, True)
    by_raw, by_ema = predict(raw, images, top_k=10), predict(averaged, images, top_k=10)
    assert by_raw != by_ema

    # The EMA weights as stored in the checkpoint, loaded by hand into a fresh model of the run's architecture
    saved = _stored(run)
    m = averaged.cfg.model
    model = build_model(m.name, len(saved["classes"]), m.width, blurpool=m.blurpool, variant=m.variant)
    model.load_state_dict(saved["model_ema"])
    pixels = torch.from_numpy(np.stack([averaged.input_pixels(path) for path, _ in images]))
    with torch.no_grad():
        probs = model.eval()(averaged.normalize(pixels)).float().softmax(1)
    for record, row in zip(by_ema, probs):
        expected = {saved["classes"][k]: round(float(p), 5) for k, p in enumerate(row)}
        assert {top["class"]: top["probability"] for top in record["top"]} == expected


def test_the_model_card_gives_the_ema_weights_and_their_accuracy(run, final_record, tmp_path):
    saved = _stored(run)
    card, raw_card = load_model(run / "last.pt", "cpu", ema=True).card, load_model(run / "last.pt", "cpu").card
    assert card["weights"] == f"EMA (decay 0.5, {saved['ema_updates']:,} updates)" and saved["ema_updates"] > 0
    assert (card["val_top1"], card["val_top5"]) == (final_record["val_top1_ema"], final_record["val_top5_ema"])
    assert raw_card["weights"] == "raw"
    assert (raw_card["val_top1"], raw_card["val_top5"]) == (final_record["val_top1"], final_record["val_top5"])

    # A tiny run's two sets of weights may score alike; figures that differ show which ones the card reads
    path = _rewritten(run, tmp_path, "distinct.pt", lambda contents: contents["metrics"].update(
        val_top1=0.1, val_top5=0.2, val_top1_ema=0.3, val_top5_ema=0.4))
    card, raw_card = load_model(path, "cpu", ema=True).card, load_model(path, "cpu").card
    assert (card["val_top1"], card["val_top5"], raw_card["val_top1"], raw_card["val_top5"]) == (0.3, 0.4, 0.1, 0.2)


def test_a_safetensors_export_of_the_ema_weights_reloads_as_the_ema_weights(run, tmp_path, capsys):
    pytest.importorskip("safetensors")
    assert cli.main(["export", "--checkpoint", str(run / "last.pt"), "--ema", "--format", "safetensors",
                     "--out", str(tmp_path / "model")]) == 0
    summary = json.loads(capsys.readouterr().out)
    averaged = load_model(run / "last.pt", "cpu", ema=True)
    assert summary["weights_used"] == averaged.card["weights"]

    again = load_model(tmp_path / "model.safetensors", "cpu")  # no --ema needed: the export holds one set
    assert again.ema and again.card == averaged.card
    assert json.loads((tmp_path / "model.json").read_text())["weights"] == "ema"
    _assert_weights_equal(again.model, _stored(run)["model_ema"])
    assert load_model(tmp_path / "model.safetensors", "cpu", ema=True).ema  # --ema on it: already the EMA's

    raw = export.export_safetensors(load_model(run / "last.pt", "cpu"), tmp_path / "raw")
    assert json.loads(Path(raw["sidecar"]).read_text())["weights"] == "raw"
    with pytest.raises(UserError, match=r"raw\.safetensors holds the raw weights.*drop --ema"):
        load_model(tmp_path / "raw.safetensors", "cpu", ema=True)


def test_a_space_made_from_the_ema_weights_serves_them(run, tmp_path):
    if importlib.util.find_spec("gradio") is None:  # not importorskip: importing Gradio takes seconds
        pytest.skip("a Space needs Gradio")
    from imagenet_resnet.serving.space import write_space

    averaged = load_model(run / "last.pt", "cpu", ema=True)
    write_space(averaged, tmp_path / "space")
    again = load_model(tmp_path / "space" / "model.safetensors", "cpu")  # as the Space's app.py loads it
    assert again.ema and again.card == averaged.card
    assert f"the {averaged.card['weights']} weights" in (tmp_path / "space" / "README.md").read_text()


def test_ema_on_a_checkpoint_without_ema_weights_is_a_one_line_error(run, images, tmp_path):
    def without_ema(saved):  # what Checkpointer writes for a run with train.ema_decay=0
        saved.update(model_ema=None, ema_updates=0)
        saved["config"]["train"]["ema_decay"] = 0.0

    path = _rewritten(run, tmp_path, "no_ema.pt", without_ema)
    proc = run_cli("predict", "--checkpoint", str(path), "--ema", str(images[0][0]), check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert str(path) in line and "train.ema_decay" in line and "drop --ema" in line
    assert load_model(path, "cpu").card["weights"] == "raw"  # without --ema it loads as before


def test_an_old_format_checkpoint_loads_with_ema(run, tmp_path):
    saved = _stored(run)
    updates = saved["ema_updates"]

    def as_averaged_model(old):  # torch.optim.swa_utils.AveragedModel's state, as checkpoints held it before
        old["model_ema"] = {**{f"module.{k}": v for k, v in old["model_ema"].items()},
                            "n_averaged": torch.tensor(updates)}
        del old["ema_updates"]

    path = _rewritten(run, tmp_path, "old.pt", as_averaged_model)
    old = load_model(path, "cpu", ema=True)
    assert old.card["weights"] == f"EMA (decay 0.5, {updates:,} updates)"
    _assert_weights_equal(old.model, saved["model_ema"])
