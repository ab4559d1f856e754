"""The accuracy tooling: `bench accuracy` (seeds, record, resumable) and `evaluate --pipeline`."""

import json

import pytest

from conftest import TINY_SETTINGS, run_cli


def _bench_args(data, runs, *extra):
    args = ["bench", "accuracy", "--data", str(data), "--runs-dir", str(runs), "--epochs", "2"]
    for setting in TINY_SETTINGS:
        args += ["--set", setting]
    return args + list(extra)


@pytest.fixture(scope="module")
def bench_record(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-accuracy")
    proc = run_cli(*_bench_args(tiny_data, out / "runs", "--seeds", "0", "1", "--eval-pipelines", "fast", "reference",
                                "--dataset", "shapes", "--json", str(out / "record.json")), timeout=600)
    return out, proc, json.loads((out / "record.json").read_text())


def test_bench_accuracy_writes_one_record_with_every_seed(bench_record):
    out, proc, record = bench_record
    assert json.loads(proc.stdout) == record  # stdout carries the record alone; the trainers' logs go to stderr
    assert record["dataset"] == "shapes" and record["model"] == "resnet18 (width 8)"
    assert (record["res"], record["epochs"], record["pipeline"]) == (32, 2, "fast")
    assert [run["seed"] for run in record["runs"]] == [0, 1]
    for run in record["runs"]:
        metrics = [json.loads(line) for line in (out / "runs" / f"seed-{run['seed']}" / "metrics.jsonl").open()]
        assert run["val_top1"] == metrics[-1]["val_top1"] and run["top1_per_epoch"] == [m["val_top1"] for m in metrics]
        assert run["seconds"] > run["train_seconds"] > 0
        check = run["eval_check"]
        assert set(check["top1"]) == {"fast", "reference"} and check["images"] == 40
        assert check["top1"]["fast"] == pytest.approx(run["val_top1"])  # the run's own eval path, same weights
        assert 0 <= check["differing_predictions"]["reference"] <= 40
    tops = [run["val_top1"] for run in record["runs"]]
    assert record["val_top1_mean"] == pytest.approx(sum(tops) / 2)
    assert record["val_top1_min"] == min(tops) and record["val_top1_max"] == max(tops)
    assert record["config"]["model"]["width"] == 8 and "torch" in record["environment"]
    # The two seeds are two different runs.
    weights = [(out / "runs" / f"seed-{s}" / "last.pt").read_bytes() for s in (0, 1)]
    assert weights[0] != weights[1]


def test_bench_accuracy_reads_finished_runs_instead_of_training_again(bench_record, tiny_data):
    out, _, record = bench_record
    again = run_cli(*_bench_args(tiny_data, out / "runs", "--seeds", "0", "1", "--dataset", "shapes"))
    assert again.stderr.count("already holds the finished run") == 2
    rerun = json.loads(again.stdout)
    assert [r["val_top1"] for r in rerun["runs"]] == [r["val_top1"] for r in record["runs"]]


def test_bench_accuracy_refuses_a_runs_folder_of_other_settings(bench_record, tiny_data):
    out, _, _ = bench_record
    proc = run_cli(*_bench_args(tiny_data, out / "runs", "--seeds", "0", "--set", "optim.lr=0.1"), check=False)
    assert proc.returncode == 2
    assert "seed-0 holds a run with other settings (optim.lr: " in proc.stderr


def test_evaluate_through_the_reference_pipeline_agrees(bench_record, tiny_data):
    out, _, record = bench_record
    checkpoint = out / "runs" / "seed-0" / "last.pt"
    fast = json.loads(run_cli("evaluate", "--json", "--checkpoint", str(checkpoint), "--data", str(tiny_data), "--workers", "0").stdout)
    reference = json.loads(run_cli("evaluate", "--json", "--checkpoint", str(checkpoint), "--data", str(tiny_data),
                                   "--workers", "0", "--pipeline", "reference").stdout)
    assert fast["pipeline"] == "fast" and reference["pipeline"].startswith("reference")
    assert fast["top1"] == pytest.approx(record["runs"][0]["eval_check"]["top1"]["fast"])
    assert reference["top1"] == pytest.approx(record["runs"][0]["eval_check"]["top1"]["reference"])
