"""Benchmarks and published figures that say what they are: `bench train` at the precision `train` would use
and no FLOP rate without a peak, `bench e2e` timing the same step as its synthetic figure, and every figure
`imagenet-resnet recipes`, the docs and the README print marked as published (with its address) or measured
(with its record in benchmarks/results)."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest
from conftest import run_cli

from imagenet_resnet.bench.train import flop_figures
from imagenet_resnet.config import LR_SCALINGS, OPTIMIZERS, PIPELINES, SCHEDULES, VARIANTS, recipe_names

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PERCENT = re.compile(r"\d+(?:\.\d+)?%")


def test_bench_train_on_a_cpu_runs_trains_precision_and_prints_no_flop_rate(tmp_path):
    out = tmp_path / "train.json"
    proc = run_cli("bench", "train", "--model", "resnet18", "--res", "32", "--batch-size", "4", "--steps", "2",
                   "--warmup", "1", "--device", "cpu", "--json", str(out))
    result = json.loads(proc.stdout)
    assert (result["precision"], result["precision_asked"]) == ("fp32", "auto")  # as `train` on a CPU, not bf16
    assert result["flop_rate"] == "peak unknown" and "achieved_tflops" not in result
    assert "TFLOP" not in proc.stdout + proc.stderr
    assert result["images_per_sec"] > 0 and json.loads(out.read_text())["peak"] == "peak unknown"


def test_bench_train_with_a_recipe_times_the_model_and_step_that_recipe_trains(tmp_path):
    """ResNet-50-D with BlurPool at 128 px, batch 64 (imagenette_128_5ep.yaml), here narrowed by --set to fit a
    CPU test; the step's EMA and Mixup from --set too, the size from the recipe, the batch from the option."""
    proc = run_cli("bench", "train", "--recipe", "imagenette_128_5ep.yaml", "--set", "model.width=8", "--set",
                   "train.ema_decay=0.99", "--set", "data.mixup_alpha=0.2", "--batch-size", "2", "--steps", "1",
                   "--warmup", "1", "--device", "cpu", "--json", str(tmp_path / "train.json"))
    result = json.loads(proc.stdout)
    assert result["model_settings"] == {"name": "resnet50", "width": 8, "zero_init_residual": True,
                                        "channels_last": True, "blurpool": True, "variant": "d"}
    assert (result["res"], result["batch_size"], result["ema_decay"], result["mixup_alpha"]) == (128, 2, 0.99, 0.2)
    record = json.loads((tmp_path / "train.json").read_text())
    assert record["recipe"] == "imagenette_128_5ep.yaml" and "model.width=8" in record["overrides"]


def test_a_slow_flop_rate_keeps_its_digits_instead_of_rounding_to_zero():
    figures = flop_figures(0.5, "resnet18", 32, {"tflops": 800.0, "source": "measured here"})
    assert 0 < figures["achieved_tflops"] < 0.001 and figures["share_of_peak"] > 0
    assert "published forward GMACs" in figures["flops_source"]


def test_bench_e2e_sets_the_same_step_timed_before_and_after_beside_the_e2e_figure(tmp_path, tiny_data):
    run_cli("prepare", str(tiny_data), "--out", str(tmp_path / "prepared"), "--pack", "--short-side", "32")
    proc = run_cli("bench", "e2e", "--data", str(tmp_path / "prepared"), "--model", "resnet18", "--res", "32",
                   "--batch-size", "8", "--steps", "4", "--warmup", "1", "--workers", "1", "--device", "cpu")
    record = json.loads(proc.stdout)
    before, after = record["synthetic_images_per_sec_before_after"]
    assert record["precision"] == "fp32" and min(before, after) <= record["synthetic_images_per_sec"] <= max(before, after)
    assert record["e2e_over_synthetic"] == pytest.approx(record["images_per_sec"] / record["synthetic_images_per_sec"],
                                                         rel=0.01)
    assert record["images_read"] == (4 + 1) * 8 and "same step" in record["synthetic_source"]
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("e2e: ") and "x the synthetic" in summary
    assert ("noise" in summary) == (record["e2e_over_synthetic"] > 1)  # the loader can only add time


def _recipes_output() -> list[str]:
    return run_cli("recipes").stdout.splitlines()


def test_recipes_mark_every_figure_published_with_its_address_or_measured_with_its_record():
    lines = _recipes_output()
    for line in lines:
        if PERCENT.search(line):
            said = line.strip()
            assert said.startswith(("published: ", "measured by us: ")), line
            assert "https://" in said if said.startswith("published") else "benchmarks/results/" in said, line
    recipes = [line.split()[0] for line in lines[1:] if line and not line.startswith(" ") and not line.startswith("use:")]
    status = [line.strip() for line in lines if line.strip().startswith(("measured by us: ", "not measured by us"))]
    assert recipes == recipe_names() and len(status) >= len(recipes)  # each recipe says whether we measured it


def test_every_figure_recipes_say_we_measured_is_the_mean_of_its_record():
    measured = [line for line in _recipes_output() if line.strip().startswith("measured by us: ")]
    assert measured
    for line in measured:
        record = json.loads((REPO / re.search(r"benchmarks/results/\S+\.json", line)[0]).read_text())
        assert PERCENT.search(line)[0] == f"{record['val_top1_mean'] * 100:.1f}%", line


def test_every_record_the_docs_cite_exists():
    cited = set()
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "src/imagenet_resnet/recipes").glob("*.yaml")]:
        cited |= set(re.findall(r"benchmarks/results/(\d{4}-[\w*.-]+?\.json|\d{4}-[\w-]+\*)", doc.read_text()))
    assert cited
    for name in cited:
        assert glob.glob(str(RESULTS / name)), f"{name} is cited but not in benchmarks/results"


def test_accuracy_tables_of_runs_match_their_records():
    records = [json.loads(path.read_text()) for path in RESULTS.glob("*.json")]
    runs_of = {tuple(f"{run['val_top1'] * 100:.2f}" for run in r["runs"]): r for r in records if "runs" in r
               and r["runs"] and "val_top1" in r["runs"][0]}
    rows = [line for line in (REPO / "docs/accuracy.md").read_text().splitlines()
            if re.fullmatch(r"\|.*\| (\d+\.\d\d ?)+\|", line)]
    assert len(rows) >= 7
    for row in rows:
        runs = tuple(row.rstrip("| ").split("|")[-1].split())
        assert runs in runs_of, row
        assert PERCENT.search(row)[0] == f"{runs_of[runs]['val_top1_mean'] * 100:.2f}%", row


def test_performance_rows_of_ours_match_their_records():
    rows = [line for line in (REPO / "docs/performance.md").read_text().splitlines() if line.startswith("| **ours**")]
    assert len(rows) == 4
    for row in rows:
        record = json.loads((REPO / re.search(r"benchmarks/results/\S+?\.json", row)[0]).read_text())
        rates = {f"{round(r['images_per_sec']):,}" for r in record["results"]}
        assert re.search(r"\*\*([\d,]+)\*\*", row)[1] in rates, row


def test_the_readme_lists_every_choice_the_settings_accept():
    readme = (REPO / "README.md").read_text()
    for choice in (*OPTIMIZERS, *SCHEDULES, *LR_SCALINGS, *PIPELINES, *VARIANTS):
        assert f"`{choice}`" in readme, f"{choice} is accepted but not in the README's options"
