import logging
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from imagenet_resnet.config import load_config
from imagenet_resnet.data.synthetic import make_shapes_dataset
from imagenet_resnet.training.trainer import train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A few seconds per run on two CPU cores: a narrow ResNet-18 on 32 px shapes.
TINY_SETTINGS = [
    "model.name=resnet18", "model.width=8", "model.channels_last=false",
    "data.train_size=32", "data.eval_size=32", "data.workers=1",
    "optim.lr=0.4", "schedule.name=cosine", "schedule.warmup_epochs=0.5",
    "train.batch_size=16", "train.device=cpu", "train.deterministic=true", "train.log_every_steps=1",
]


def pytest_addoption(parser):
    parser.addini("quick_tests", type="linelist", help="the test files `-m quick` runs (the README's quick subset)")


def pytest_collection_modifyitems(config, items):
    """The quick marker on every test of the files pyproject.toml's quick_tests lists, so that one list says it."""
    quick = set(config.getini("quick_tests"))
    for item in items:
        if item.nodeid.split("::")[0] in quick:
            item.add_marker(pytest.mark.quick)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """10 classes x 12 train / 4 val images of 40 px."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), train_per_class=12, val_per_class=4, size=40)


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder no command can write into: a read-only bind mount of an empty folder where this process may
    mount (root here and in CI), else a path under /proc, where every mkdir and write is refused."""
    source, target = tmp_path / "ro-source", tmp_path / "read-only"
    source.mkdir()
    target.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(target)], capture_output=True)
    if mounted.returncode != 0:
        yield Path("/proc/imagenet-resnet-test/read-only")
        return
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def run_cli(*args: str, timeout: float = 300, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m imagenet_resnet ...` in a fresh process, as a user's shell would (in `cwd`: a folder
    outside the repository shows what a user who installed the package sees)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "imagenet_resnet", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def tiny_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["train", "--data", str(data), "--out", str(out)]
    for setting in TINY_SETTINGS:
        args += ["--set", setting]
    return args + list(extra)


def train_tiny(data: Path, out: Path, *settings: str, epochs: int = 2, resume: bool = False) -> dict:
    """What `imagenet-resnet train` does with TINY_SETTINGS and `--set` each of `settings`, in this process: for
    the tests that involve no signal and no torchrun, a new process per run would only cost time."""
    cfg = load_config(None, [*TINY_SETTINGS, f"data.path={data}", f"train.epochs={epochs}", *settings])
    return train(cfg, out, resume=resume)


def sigterm_after(args: list[str], line_part: str) -> str:
    """Run `python -m imagenet_resnet ARGS`, send it SIGTERM (a spot instance reclaimed) once it printed a line
    holding `line_part`, and return its whole output after checking it exited as a signalled run does."""
    proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = []
    for line in proc.stdout:
        output.append(line)
        if line_part in line:
            break
    proc.send_signal(signal.SIGTERM)
    output.append(proc.stdout.read())
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "".join(output)
    return "".join(output)


# --- moto's S3 server on loopback (the tests of --mirror, --data s3://, report/status of a URL) --------------

S3_BUCKET = "runs"
S3_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIDMIRRORTEST7QX2", "AWS_SECRET_ACCESS_KEY": "mirror-secret-9d1f4b7e2a"}


class S3Server:
    """moto's S3 server in a thread of this process, so that its buckets outlive a stop and a restart."""

    def __init__(self):
        from helpers import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()

    def fs(self):
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.invalidate_cache()
        return fs


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server for the module, with test credentials in the environment (never written anywhere)."""
    s3fs = pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = S3Server()
    env = {**S3_SECRETS, "AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_MAX_ATTEMPTS": "2",  # a refused connection fails in a second, not after botocore's 5 tries
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    # Each module that uses this fixture gets a server of its own (its own port) but moto keeps its buckets in
    # this process: they are emptied first. And fsspec keeps one S3FileSystem per set of arguments, bound to the
    # endpoint it was made for: none is left bound to a server that is gone.
    s3fs.S3FileSystem.clear_instance_cache()
    server.start()
    urllib.request.urlopen(urllib.request.Request(f"{server.endpoint}/moto-api/reset", method="POST")).close()
    server.fs().mkdir(S3_BUCKET)
    yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
