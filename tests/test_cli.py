"""The command line itself: fast help, --version, documented options, and how errors reach the user."""

import argparse
import subprocess
import sys

import pytest

from imagenet_resnet import __version__, cli
from imagenet_resnet.errors import UserError


def test_help_imports_no_torch():
    """`imagenet-resnet --help` must not wait seconds for torch: nothing heavy is imported before a command runs."""
    probe = ("import sys; from imagenet_resnet import cli; cli.build_parser(); "
             "print(sorted(m for m in ('torch', 'numpy', 'PIL', 'matplotlib', 'gradio') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"imagenet-resnet {__version__}"


def _commands(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {inner}", p) for inner, p in _commands(sub))


def test_every_command_has_a_description_and_every_option_a_help():
    commands = dict(_commands(cli.build_parser()))
    assert {"prepare", "train", "evaluate", "bench", "bench accuracy", "bench train", "serve", "export"} <= set(commands)
    for name, parser in commands.items():
        assert parser.description, name
        for action in parser._actions:
            if action.dest not in ("help", "bench") and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {action.option_strings or action.dest}"


def test_an_expected_problem_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imagenet-resnet report: ") and "is this a run folder?" in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ValueError("a bug, not the user's doing")

    monkeypatch.setattr(cli, "cmd_report", broken)
    with pytest.raises(ValueError, match="a bug"):  # not swallowed into one line
        cli.main(["report", "anything"])


def test_out_of_memory_keeps_its_traceback_and_adds_a_hint(monkeypatch, capsys):
    class OutOfMemoryError(RuntimeError):  # the name torch.cuda.OutOfMemoryError has
        pass

    def runs_out(args):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "cmd_report", runs_out)
    assert cli.main(["report", "anything"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "Tried to allocate" in err
    assert err.strip().splitlines()[-1] == f"imagenet-resnet report: {cli.OUT_OF_MEMORY_HINT}"


def test_user_error_is_a_value_error():
    """Callers that catch bad values (the server's upload checks) keep catching the project's errors."""
    assert issubclass(UserError, ValueError)


def test_train_without_data_or_recipe_takes_the_demos_settings(tmp_path):
    """As it says: the built-in shapes with the demo's small network, not the config's ResNet-50 on a CPU."""
    proc = subprocess.run([sys.executable, "-m", "imagenet_resnet", "train", "--dry-run"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "with the demo's settings" in proc.stdout
    assert "plan: resnet18 (width 12) | 10 classes" in proc.stdout and "9 epochs" in proc.stdout
