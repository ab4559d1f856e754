"""What every benchmark record carries: the command, the machine and the versions, so that a figure can be
traced to how it was made; printed as one JSON line and kept in a file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def save_record(record: dict, json_path: str | None) -> None:
    """Keep a benchmark record in `json_path` (if given), replacing what an earlier call kept there."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n")


def write_record(result: dict, json_path: str | None) -> None:
    """Print a benchmark's figures as one JSON line, with the command and machine, and keep them in `json_path`."""
    record = {"command": " ".join(["imagenet-resnet"] + sys.argv[1:]), "environment": environment(),
              "cpu_count": os.cpu_count(), **result}
    print(json.dumps(record))
    save_record(record, json_path)
