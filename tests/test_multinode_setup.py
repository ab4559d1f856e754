"""A job over several nodes: which network interface gloo binds (GLOO_SOCKET_IFNAME, chosen by the run when
unset), a connection that cannot be made stopping in one line instead of hanging for gloo's 30 minutes, and a
two-node torchrun job on loopback, each node with its own run folder, trained to its end. The interface choice
is checked against this machine's real interfaces and, where iproute2 is installed, against `ip route`."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import TINY_SETTINGS
from helpers import free_port
from imagenet_resnet.training import checkpoint
from imagenet_resnet.training.network import gloo_interface

STEPS = 3  # 1 epoch of tiny_data's 120 images at global batch 32 (2 nodes x batch 16)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the interface names are Linux's")


def _settings() -> list[str]:
    args = []
    for setting in [s for s in TINY_SETTINGS if not s.startswith("data.workers")] + ["data.workers=0",
                                                                                     "train.log_every_steps=0"]:
        args += ["--set", setting]
    return args


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("GLOO_SOCKET_IFNAME", None)  # the run chooses it, unless a test sets it
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: nothing left hanging
        raise
    return out


def _ip_route(*args: str) -> str | None:
    """The device `ip route ...` names, or None where iproute2 is missing or there is no such route."""
    if shutil.which("ip") is None:
        return None
    words = subprocess.run(["ip", "route", *args], capture_output=True, text=True).stdout.split()
    return words[words.index("dev") + 1] if "dev" in words else None


@linux_only
@pytest.mark.parametrize("master", ["127.0.0.1", "localhost", "::1"])
def test_a_loopback_master_means_the_loopback_interface(master):
    if master == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    assert gloo_interface(master) == "lo"


@linux_only
def test_another_machine_is_reached_through_the_interface_its_route_takes():
    expected = _ip_route("get", "10.1.2.3")
    if expected is None:
        pytest.skip("no route to another machine here, or no iproute2 to check against")
    assert gloo_interface("10.1.2.3") == expected


@linux_only
def test_this_machines_own_name_on_loopback_means_the_default_routes_interface():
    """Node 0 on Debian's /etc/hosts: MASTER_ADDR is its own name, 127.0.1.1 here, its real address to the
    other nodes; binding the loopback interface is what makes their connections fail."""
    name = socket.gethostname()
    resolved = {info[4][0] for info in socket.getaddrinfo(name, None)}
    if name == "localhost" or not all(address.startswith("127.") or address == "::1" for address in resolved):
        pytest.skip(f"this machine's name {name} resolves to {resolved}, not to a loopback address")
    expected = _ip_route("show", "default")
    if expected is None:
        pytest.skip("no default route here, or no iproute2 to check against")
    assert gloo_interface(name) == expected


def test_two_nodes_on_loopback_choose_the_interface_and_train_to_the_end(tmp_path, tiny_data):
    """torchrun --nnodes 2 with c10d rendezvous, a folder per node: rank 0 says which interface gloo binds."""
    port = free_port()
    launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id=nodes-{port}", "--local-addr=127.0.0.1"]  # MASTER_ADDR: the rank 0 node's address
    started = time.monotonic()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "imagenet_resnet",
                               "train", "--data", str(tiny_data), "--out", str(tmp_path / f"node-{n}"),
                               "--epochs", "1", *_settings()],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                              start_new_session=True) for n in range(2)]
    outputs = [_finish(node) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    chosen = "GLOO_SOCKET_IFNAME=lo (the interface that reaches MASTER_ADDR 127.0.0.1; set GLOO_SOCKET_IFNAME"
    assert sum(out.count(chosen) for out in outputs) == 1  # rank 0 says it, on whichever node it is
    writer = next(n for n, out in enumerate(outputs) if chosen in out)
    assert checkpoint.load(tmp_path / f"node-{writer}" / "last.pt")["progress"]["global_step"] == STEPS
    assert not (tmp_path / f"node-{1 - writer}" / "last.pt").exists()  # rank 0 alone writes
    print(f"two nodes, 1 epoch: {time.monotonic() - started:.1f} s")


def _rank_0_without_its_peer(store_port: int, **env: str | None) -> subprocess.CompletedProcess:
    """Rank 0 of a 2-node job whose other node never connects, as torchrun starts it: the agent's store
    (hosted here) and the environment torchrun gives a worker. The connect timeout is shortened to 2 s."""
    code = ("from datetime import timedelta\n"
            "from imagenet_resnet.errors import UserError\n"
            "from imagenet_resnet.training import distributed\n"
            "distributed.GLOO_CONNECT_TIMEOUT = timedelta(seconds=2)\n"
            "try:\n"
            "    distributed.init('cpu')\n"
            "except UserError as e:\n"
            "    print('UserError:', e)\n")
    worker = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", GROUP_WORLD_SIZE="2",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store_port), TORCHELASTIC_USE_AGENT_STORE="True")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=_env(**worker, **env))


@pytest.mark.parametrize("preset", [None, "lo"])
def test_a_peer_that_never_connects_stops_the_job_in_one_line_within_the_connect_timeout(preset):
    from torch.distributed import TCPStore

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # torchrun's agent store
    started = time.monotonic()
    done = _rank_0_without_its_peer(port, GLOO_SOCKET_IFNAME=preset)
    elapsed = time.monotonic() - started
    del store
    errors = [line for line in done.stdout.splitlines() if line.startswith("UserError:")]
    assert len(errors) == 1, done.stdout + done.stderr
    assert "did not connect over gloo within 2 s" in errors[0] and "this process used lo" in errors[0]
    assert "GLOO_SOCKET_IFNAME" in errors[0] and "NCCL_SOCKET_IFNAME" in errors[0]
    chose = "GLOO_SOCKET_IFNAME=lo (the interface that reaches MASTER_ADDR 127.0.0.1" in done.stdout
    assert chose == (preset is None)  # a GLOO_SOCKET_IFNAME the user set is kept, and nothing said
    assert elapsed < 30  # torch's import and the 2 s, not gloo's 30 minutes


def test_no_interface_and_a_name_on_loopback_stop_in_one_line_naming_both_variables(tmp_path, tiny_data):
    resolved = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    if not all(address.startswith("127.") or address == "::1" for address in resolved):
        pytest.skip(f"this machine's name resolves to {resolved}: gloo's own choice would do")
    worker = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", MASTER_ADDR="head.invalid",
                  MASTER_PORT=str(free_port()))  # .invalid never resolves (RFC 2606)
    done = subprocess.run([sys.executable, "-m", "imagenet_resnet", "train", "--data", str(tiny_data), "--out",
                           str(tmp_path / "run"), *_settings()], capture_output=True, text=True, timeout=120,
                          env=_env(**worker))
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("imagenet-resnet train: cannot tell which network interface reaches MASTER_ADDR "
                           "head.invalid"), done.stderr
    assert "GLOO_SOCKET_IFNAME" in last and "NCCL_SOCKET_IFNAME" in last
