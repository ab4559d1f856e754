"""examples/skypilot/train-spot.yaml: SkyPilot reads it as the task we mean, and its run command, executed by
bash as SkyPilot does on each node, launches torchrun with arguments torchrun's and our own parsers accept, and
the same global batch whatever GPUs the job lands on."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imagenet_resnet import cli

ROOT = Path(__file__).resolve().parents[1]
SPOT_TASK = ROOT / "examples" / "skypilot" / "train-spot.yaml"
ACCELERATORS = {"H100": 8, "A100-80GB": 8, "A100": 8, "L40S": 4, "L4": 8}
PLACEHOLDERS = {"DATA": "s3://my-bucket/imagenet-prepared", "RUN": "s3://my-bucket/runs/r50"}


def _task() -> dict:
    return yaml.safe_load(SPOT_TASK.read_text())


def test_skypilot_reads_a_spot_job_on_any_of_the_gpus(tmp_path):
    sky = pytest.importorskip("sky", reason="skypilot's pins (click<8.2, uvicorn<0.36) conflict with the test "
                              "extra's gradio/huggingface_hub: pip install skypilot in a venv of its own")
    with pytest.raises(ValueError, match="'DATA' is None"):  # the bucket URLs must be given at launch
        sky.Task.from_yaml(str(SPOT_TASK))
    filled = _task()
    filled["envs"].update(PLACEHOLDERS)
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(filled))
    task = sky.Task.from_yaml(str(tmp_path / "task.yaml"))
    assert {name: count for r in task.resources for name, count in r.accelerators.items()} == ACCELERATORS
    for resources in task.resources:
        assert resources.use_spot and str(resources.cloud) == "AWS" and resources.disk_size >= 200
        assert resources.job_recovery["max_restarts_on_errors"] >= 1
    assert task.envs["RUN"] == PLACEHOLDERS["RUN"] and task.num_nodes == 1
    assert task.workdir is None and sorted(task.file_mounts.values()) == ["README.md", "pyproject.toml", "src"]
    assert "torchrun" in task.run and "imagenet_resnet train" in task.run


def _run_command(tmp_path: Path, gpus_per_node: int, nodes: int, gpu_mb: int, node_rank: int = 0,
                 **envs: str) -> subprocess.CompletedProcess:
    """The task's run command on one node, run by bash as SkyPilot does, with `torchrun` and `nvidia-smi`
    stand-ins first on PATH: torchrun's writes its arguments to tmp_path/args and exits with TORCHRUN_EXIT (3:
    a failure, so the script ends there)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\nexit "${TORCHRUN_EXIT:-3}"\n')
    (bin_dir / "nvidia-smi").write_text(f'#!/bin/sh\nfor i in $(seq {gpus_per_node}); do echo {gpu_mb}; done\n')
    for stand_in in bin_dir.iterdir():
        stand_in.chmod(0o755)
    task = _task()
    env = {**os.environ, **{k: str(v) for k, v in task["envs"].items()}, **PLACEHOLDERS, **envs,
           "HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGS_FILE": str(tmp_path / "args"),
           "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus_per_node), "SKYPILOT_NUM_NODES": str(nodes),
           "SKYPILOT_NODE_RANK": str(node_rank),
           "SKYPILOT_NODE_IPS": "\n".join(f"10.0.0.{i + 1}" for i in range(nodes))}
    return subprocess.run(["bash", "-c", task["run"]], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("gpus_per_node, nodes, gpu_mb", [
    (8, 1, 81559),  # H100 / A100-80GB
    (8, 1, 40960),  # A100 40 GB
    (4, 1, 46068),  # L40S: 512 per GPU, 2 steps of accumulation
    (8, 1, 23034),  # L4: 256 per GPU
    (8, 2, 81559),  # two nodes: sky jobs launch --num-nodes 2
])
def test_the_run_command_launches_our_train_on_every_gpu_choice(tmp_path, gpus_per_node, nodes, gpu_mb):
    from torch.distributed.run import get_args_parser

    done = _run_command(tmp_path, gpus_per_node, nodes, gpu_mb, node_rank=nodes - 1)
    assert done.returncode == 3, done.stderr  # the trainer's exit status goes to SkyPilot as it is
    torchrun = get_args_parser().parse_args((tmp_path / "args").read_text().splitlines())
    assert torchrun.module and torchrun.training_script == "imagenet_resnet"
    assert (torchrun.nnodes, torchrun.node_rank, torchrun.nproc_per_node) == (str(nodes), nodes - 1,
                                                                               str(gpus_per_node))
    assert torchrun.master_addr == "10.0.0.1"  # every node meets at the first node's address
    args, unknown = cli.build_parser().parse_known_args(torchrun.training_script_args)
    assert not unknown, f"options our train does not know: {unknown}"
    assert args.command == "train" and args.resume and args.mirror == PLACEHOLDERS["RUN"]
    assert args.data == PLACEHOLDERS["DATA"] and args.budget == _task()["envs"]["BUDGET"]
    assert args.out == str(tmp_path / "run")
    cfg = cli._config_for_train(args)  # the recipe, the budget and every --set resolve to a valid config
    t = cfg.train
    assert t.batch_size * t.accumulation_steps * gpus_per_node * nodes == int(_task()["envs"]["GLOBAL_BATCH"])
    assert t.batch_size <= (512 if gpu_mb >= 40000 else 256)
    assert cfg.model.name == "resnet50" and t.budget == "8h"


def test_after_a_clean_exit_the_job_ends_only_once_the_run_has_finished(tmp_path):
    """A spot notice stops training with status 0: the job must then wait for the reclaim, not end (SkyPilot
    would count it done). Whether the run finished is `imagenet-resnet status RUN --json`, here of a folder."""
    run = tmp_path / "mirror"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  epochs: 2\n")
    (run / "train.log").write_text("00:00:00 resnet50 | 1000 classes | 10 steps/epoch x 2 epochs | workers 8\n")
    record = {"step": 10, "val_top1": 0.5, "images_per_sec": 1000.0, "epoch_seconds": 10.0, "time": time.time()}
    (run / "metrics.jsonl").write_text(json.dumps({**record, "epoch": 1}) + "\n")
    stopped = _run_command(tmp_path, 8, 1, 81559, RUN=str(run), TORCHRUN_EXIT="0", RECLAIM_WAIT="0")
    assert stopped.returncode == 1 and "waiting for the instance to be reclaimed" in stopped.stdout, stopped.stderr
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**record, "epoch": 2, "step": 20}) + "\n")
    finished = _run_command(tmp_path, 8, 1, 81559, RUN=str(run), TORCHRUN_EXIT="0", RECLAIM_WAIT="0")
    assert finished.returncode == 0 and "reclaimed" not in finished.stdout, finished.stderr


def test_the_job_uploads_the_package_alone_and_setup_builds_it_from_that(tmp_path):
    """`workdir: .` uploaded the whole clone but what .gitignore leaves out (runs/, demo-run/): an export, a
    report or a prepared folder made inside the clone went with every launch. Now file_mounts names what goes,
    and pip builds the package from exactly that, as setup does (no index reached: --no-deps, no isolation)."""
    task = _task()
    assert "workdir" not in task
    uploaded = tmp_path / "imagenet-resnet"
    for remote, local in task["file_mounts"].items():
        assert remote.startswith("~/imagenet-resnet/"), remote
        target = uploaded / remote.removeprefix("~/imagenet-resnet/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / local).is_dir():
            shutil.copytree(ROOT / local, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / local, target)
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "pyproject.toml", "src"]
    setup = [line.strip() for line in task["setup"].splitlines()]
    assert setup.index("cd ~/imagenet-resnet") < setup.index('pip install ".[cloud,gpu]"')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "wheel"), str(uploaded)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("imagenet_resnet-*.whl"))
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True).stdout
    assert "imagenet_resnet/cli.py" in names and "imagenet_resnet/recipes/resnet50_ffcv88.yaml" in names


def test_the_setup_installs_extras_that_exist():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    setup = _task()["setup"]
    installs = [shlex.split(line) for line in setup.splitlines() if line.strip().startswith("pip install")]
    local = [arg for words in installs for arg in words if arg.startswith(".[")]
    assert local, setup
    for arg in local:
        assert set(arg[2:-1].split(",")) <= set(extras), f"{arg}: extras are {sorted(extras)}"

