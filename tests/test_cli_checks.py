"""What the command line refuses before any work, in one line: numbers out of range, outputs that cannot be
written, devices that are not here, Grad-CAM layers a model lacks; and a failure once loader workers have
started still ends the process."""

import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import run_cli, tiny_train_args, train_tiny
from imagenet_resnet import cli
from imagenet_resnet.data.synthetic import complete_stamp
from imagenet_resnet.errors import UserError
from imagenet_resnet.evaluation.command import evaluate_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    """A finished one-epoch run folder (last.pt, best.pt, metrics.jsonl)."""
    folder = tmp_path_factory.mktemp("checks") / "run"
    train_tiny(tiny_data, folder, epochs=1)
    return folder


# --- numeric options (item 8) --------------------------------------------------------------------------------

def _options(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif action.option_strings:
            yield " ".join(path), action


def test_every_numeric_option_has_a_checked_range():
    """A plain int or float type takes 0 and -3 for a batch size: each numeric option says its range."""
    unchecked = [f"{command} {action.option_strings[0]}" for command, action in _options(cli.build_parser())
                 if action.type in (int, float)]
    assert unchecked == []


@pytest.mark.parametrize("args, option", [
    (["evaluate", "--checkpoint", "c.pt", "--data", "d", "--batch-size", "-3"], "--batch-size"),
    (["evaluate", "--checkpoint", "c.pt", "--data", "d", "--size", "0"], "--size"),
    (["evaluate", "--checkpoint", "c.pt", "--data", "d", "--workers", "-2"], "--workers"),
    (["predict", "--checkpoint", "c.pt", "x.jpg", "--top-k", "-1"], "--top-k"),
    (["predict", "--checkpoint", "c.pt", "x.jpg", "--top-k", "0"], "--top-k"),
    (["explain", "--checkpoint", "c.pt", "x.jpg", "--num-show", "0"], "--num-show"),
    (["serve", "--checkpoint", "c.pt", "--port", "70000"], "--port"),
    (["serve", "--checkpoint", "c.pt", "--concurrency", "0"], "--concurrency"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--mirror-wait", "nan"], "--mirror-wait"),
    (["find-lr", "--start-lr", "-1"], "--start-lr"),
    (["prepare", "src", "--out", "o", "--quality", "101"], "--quality"),
    (["export", "--checkpoint", "c.pt", "--format", "onnx", "--out", "m", "--opset", "0"], "--opset"),
    (["bench", "train", "--batch-size", "256", "0"], "--batch-size"),
    (["bench", "train", "--ema-decay", "1"], "--ema-decay"),
])
def test_a_number_out_of_range_is_argparses_error(args, option, capsys):
    with pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args(args)
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"error: argument {option}: " in err.splitlines()[-1], err


def test_evaluate_batch_size_0_exits_at_once(tmp_path):
    """It was a ZeroDivisionError, after which the loader's workers kept the process alive for ever."""
    proc = run_cli("evaluate", "--checkpoint", str(tmp_path / "c.pt"), "--data", str(tmp_path), "--batch-size", "0",
                   check=False, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == ("imagenet-resnet evaluate: error: argument --batch-size: 0 is out of "
                                            "range: give a whole number >= 1")


def test_evaluate_checkpoint_refuses_sizes_a_caller_gives(run, tiny_data):
    with pytest.raises(UserError, match="batch_size >= 1"):
        evaluate_checkpoint(run / "best.pt", tiny_data, batch_size=0)
    with pytest.raises(UserError, match="size >= 1"):  # was: 0 meant the run's own size, silently
        evaluate_checkpoint(run / "best.pt", tiny_data, size=0)


# A bug once the loader has started its workers: the sampler's length (asked for the first batches, after the
# workers are up) fails, as --batch-size 0 did. Before, those workers (which ignore SIGTERM) were known only to
# the failed frames, and the process never exited.
SAMPLER_BUG = """
import sys
from imagenet_resnet import cli
from imagenet_resnet.data import loader

def fails(self):
    raise RuntimeError("a bug in the sampler")

loader.EpochBatchSampler.__len__ = fails
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_bug_once_loader_workers_started_still_ends_the_process(run, tiny_data):
    proc = subprocess.run([sys.executable, "-c", SAMPLER_BUG, "evaluate", "--checkpoint", str(run / "best.pt"),
                           "--data", str(tiny_data), "--workers", "2"], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug in the sampler" in proc.stderr  # kept: a bug


# --- outputs that cannot be written (item 9) -----------------------------------------------------------------
# One command in a process of its own, as a user runs it; the others through cli.main in this process, which is
# the same code without a second torch import (ten seconds on a busy machine).

def _refused(capsys, command: str, *args: str) -> str:
    """`imagenet-resnet COMMAND ARGS` in this process: exit status 2 and one line, from the command itself."""
    assert cli.main([command, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"imagenet-resnet {command}: "), err
    return err


def test_train_into_a_read_only_out(read_only_dir, tiny_data):
    proc = run_cli(*tiny_train_args(tiny_data, read_only_dir / "run", "--epochs", "1"), check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"imagenet-resnet train: {read_only_dir / 'run'}: cannot write there")
    assert proc.stderr.rstrip().endswith("give --out a folder you can write to")


def test_report_into_a_read_only_out(read_only_dir, run, capsys):
    err = _refused(capsys, "report", str(run), "--out", str(read_only_dir / "report"))
    assert "cannot write there" in err and "give --out a folder" in err


def test_report_of_a_read_only_run_folder_goes_to_out(read_only_dir, run, tmp_path, capsys):
    """A run folder one cannot write to (a colleague's, a read-only share): refused in one line, and with
    --out the plots and training_log.md both go there."""
    if not read_only_dir.exists():
        pytest.skip("no read-only bind mount here: nothing to read a run from")
    shutil.copy(run / "metrics.jsonl", tmp_path / "ro-source" / "metrics.jsonl")  # the mount's source
    err = _refused(capsys, "report", str(read_only_dir))
    assert f"{read_only_dir}: cannot write there" in err and "give --out a folder" in err
    out = tmp_path / "elsewhere"
    assert cli.main(["report", str(read_only_dir), "--out", str(out)]) == 0
    assert str(out / "training_log.md") in json.loads(capsys.readouterr().out)["files"]
    assert (out / "training_log.md").is_file() and [p.name for p in read_only_dir.iterdir()] == ["metrics.jsonl"]


def test_explain_into_a_read_only_folder(read_only_dir, run, tiny_data, capsys):
    err = _refused(capsys, "explain", "--checkpoint", str(run / "best.pt"), "--data", str(tiny_data), "--out",
                   str(read_only_dir / "gradcam.png"))
    assert "cannot write there" in err and "give --out a folder" in err


def test_export_into_a_read_only_folder(read_only_dir, run, capsys):
    pytest.importorskip("safetensors")
    err = _refused(capsys, "export", "--checkpoint", str(run / "best.pt"), "--format", "safetensors", "--out",
                   str(read_only_dir / "model.safetensors"))
    assert "cannot write there" in err and "give --out a folder" in err


def test_files_written_at_the_end_are_checked_first(read_only_dir, run, tiny_data, tmp_path, capsys):
    """evaluate --per-class-csv and find-lr --plot: before the evaluation or the sweep, not after."""
    err = _refused(capsys, "evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(tiny_data),
                   "--per-class-csv", str(read_only_dir / "classes.csv"))
    assert "cannot write there" in err and "give --per-class-csv a folder" in err
    err = _refused(capsys, "find-lr", "--data", str(tiny_data), "--plot", str(read_only_dir / "lr.png"))
    assert "cannot write there" in err and "give --plot a folder" in err
    err = _refused(capsys, "explain", "--checkpoint", str(run / "best.pt"), "--data", str(tiny_data), "--out",
                   str(tmp_path))
    assert f"{tmp_path} is a folder; give --out a file name" in err


# --- devices, --top-k, --layer (item 11) ---------------------------------------------------------------------

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the advice is for a machine without a GPU")


@no_gpu
def test_a_gpu_asked_for_on_a_cpu_machine_is_advised_with_this_commands_option(run, tiny_data, capsys):
    proc = run_cli("predict", "--checkpoint", str(run / "best.pt"), str(tiny_data / "val"), "--device", "cuda",
                   check=False)
    assert proc.returncode == 2 and proc.stderr == ("imagenet-resnet predict: --device cuda: PyTorch sees no CUDA GPU "
                                                    "on this machine; use --device cpu\n")
    for command, device in (("predict", "gpu"), ("evaluate", "cuda:0"), ("explain", "GPU")):  # gpu: was a traceback
        inputs = [str(tiny_data / "val")] if command == "predict" else ["--data", str(tiny_data)]
        err = _refused(capsys, command, "--checkpoint", str(run / "best.pt"), *inputs, "--device", device)
        assert f"--device {device}: PyTorch sees no CUDA GPU" in err and "use --device cpu" in err


def test_a_device_name_torch_does_not_know(run, tiny_data, capsys):
    err = _refused(capsys, "predict", "--checkpoint", str(run / "best.pt"), str(tiny_data / "val"), "--device", "tpu")
    assert "--device tpu: not a device" in err and "auto, cpu, cuda or cuda:N" in err


@no_gpu
def test_the_config_device_is_advised_with_set(tiny_data, tmp_path, capsys):
    err = _refused(capsys, *tiny_train_args(tiny_data, tmp_path / "run", "--set", "train.device=gpu"))
    assert "--set train.device=gpu: PyTorch sees no CUDA GPU" in err and "use --set train.device=cpu" in err


def test_explain_names_the_layers_a_model_has(run, tiny_data, tmp_path, capsys):
    err = _refused(capsys, "explain", "--checkpoint", str(run / "best.pt"), "--data", str(tiny_data), "--layer",
                   "layer9", "--out", str(tmp_path / "g.png"))
    assert "--layer layer9" in err and "layer1, layer2, layer3, layer4" in err
    assert not (tmp_path / "g.png").exists()


# --- polish --------------------------------------------------------------------------------------------------

def test_help_names_every_command():
    description = run_cli("--help").stdout.split("positional arguments")[0]
    commands = ("prepare", "train", "find-lr", "recipes", "demo", "evaluate", "report", "status", "predict", "explain",
                "serve", "export", "bench")
    assert all(command in description for command in commands), description


def test_evaluate_says_where_per_class_accuracy_is(run, tiny_data, capsys):
    assert cli.main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(tiny_data), "--workers", "0"]) == 0
    assert "per class   not written (add --per-class-csv FILE)" in capsys.readouterr().out
    assert "per-class-csv" in cli.build_parser()._subparsers._group_actions[0].choices["evaluate"].description


def test_demo_says_whether_it_makes_or_reuses_the_dataset(tmp_path):
    """Each demo is stopped at its first line (a demo takes a minute and more); the two run side by side."""
    complete_stamp(tmp_path / "done").parent.mkdir()
    complete_stamp(tmp_path / "done").touch()  # what make_shapes_dataset leaves once a copy is complete
    demos = [subprocess.Popen([sys.executable, "-m", "imagenet_resnet", "demo", "--data", str(tmp_path / data),
                               "--out", str(tmp_path / f"run-{data}")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for data in ("new", "done")]
    try:
        first = [demo.stdout.readline() for demo in demos]
    finally:
        for demo in demos:
            demo.kill()
            demo.wait()
            demo.stdout.close()
    assert first[0].startswith("generating the shapes dataset") and first[1].startswith("reusing the shapes dataset")
