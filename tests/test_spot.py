"""train --spot-notice: the metadata poller against a loopback AWS IMDSv2 / GCP metadata service
(tests/metadata_server.py; never a real metadata address), the stop it causes, and a real training process
that gets a notice, checkpoints, exits 0 and is resumed on a new machine from its mirror."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from conftest import run_cli, tiny_train_args
from imagenet_resnet.config import ConfigError, load_config
from imagenet_resnet.training import checkpoint, spot
from imagenet_resnet.training.distributed import Dist
from imagenet_resnet.training.spot import SpotNotice, spot_notice_for
from imagenet_resnet.training.stopping import StopPolicy
from metadata_server import MetadataServer

AWS_PATH = "/latest/meta-data/spot/instance-action"
GCP_PATH = "/computeMetadata/v1/instance/preempted"
AWS_NOTICE = "AWS spot interruption notice: terminate at 08:22:00Z"
GCP_NOTICE = "GCP preemption notice: the instance stops in about 30 s"
STEPS_PER_EPOCH = 7  # 120 images // batch 16
CPU = torch.device("cpu")


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.mark.parametrize("provider, path, notice", [("aws", AWS_PATH, AWS_NOTICE), ("gcp", GCP_PATH, GCP_NOTICE)])
def test_the_poller_sees_no_notice_then_the_notice(provider, path, notice):
    heard = []
    with MetadataServer() as server:
        poller = SpotNotice(provider, server.url, poll_seconds=0.02)
        poller.start(on_notice=heard.append)
        try:
            _wait_for(lambda: len(server.statuses("GET", path)) >= 3)
            assert poller.notice is None and not heard
            server.preempted = True
            _wait_for(lambda: poller.notice is not None)
        finally:
            poller.stop()
        assert poller.notice == notice and heard == [notice]
        answered = server.statuses("GET", path)
        assert answered[-1] == 200 and set(answered[:-1]) == ({404} if provider == "aws" else {200})
        # One token serves every poll while it is valid; GCP needs none.
        assert server.statuses("PUT", "/latest/api/token") == ([200] if provider == "aws" else [])


def test_aws_refuses_a_get_without_a_token_and_the_poller_takes_a_new_one_after_a_401():
    with MetadataServer() as server:
        with pytest.raises(urllib.error.HTTPError) as refused:  # the stand-in plays IMDSv2's rule
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(server.url + AWS_PATH, timeout=2)
        assert refused.value.code == 401
        poller = SpotNotice("aws", server.url)
        assert poller.check() is None
        server.revoke_tokens()  # as when a token expired or the service restarted
        assert poller.check() is None
        assert server.statuses("GET", AWS_PATH) == [401, 404, 401, 404]
        assert server.statuses("PUT", "/latest/api/token") == [200, 200]


def test_aws_token_is_renewed_before_it_expires(monkeypatch):
    monkeypatch.setattr(spot, "AWS_TOKEN_REFRESH_MARGIN_SECONDS", spot.AWS_TOKEN_TTL_SECONDS)  # due at once
    with MetadataServer() as server:
        poller = SpotNotice("aws", server.url)
        assert poller.check() is None and poller.check() is None
        assert server.statuses("PUT", "/latest/api/token") == [200, 200]
        assert server.statuses("GET", AWS_PATH) == [404, 404]  # never refused: renewed before it lapsed


class HangUpServer:
    """A loopback port that accepts each connection and closes it at once, counting them: a metadata service
    that cannot be read, which still shows how often it was tried."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()


@pytest.mark.parametrize("provider, cloud", [("aws", "an AWS EC2 instance"), ("gcp", "a Google Compute Engine instance")])
def test_an_unreadable_service_warns_once_and_polling_goes_on(provider, cloud, monkeypatch):
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    hang_up = HangUpServer()
    poller = SpotNotice(provider, hang_up.url, poll_seconds=0.01)
    with pytest.warns(UserWarning) as warned:
        poller.start()
        try:
            _wait_for(lambda: hang_up.connections >= 5)
            assert poller._thread.is_alive()
        finally:
            poller.stop()
            hang_up.socket.close()
    ours = [str(w.message) for w in warned if "--spot-notice" in str(w.message)]
    assert len(ours) == 1 and not thread_errors and poller.notice is None
    message = ours[0]
    assert "\n" not in message and poller.url in message and f"needs to run on {cloud}" in message


def test_a_refused_connection_warns_once_too():
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # nothing listens there once closed
    poller = SpotNotice("aws", f"http://127.0.0.1:{port}", poll_seconds=0.01)
    with pytest.warns(UserWarning, match=f"cannot read http://127.0.0.1:{port}{AWS_PATH}") as warned:
        poller.start()
        time.sleep(0.3)
        poller.stop()
    assert len([w for w in warned if "--spot-notice" in str(w.message)]) == 1


def _spot_warnings(warned) -> list[str]:
    return [str(w.message) for w in warned if "--spot-notice" in str(w.message)]


def test_in_a_container_one_hop_too_far_the_warning_names_the_hop_limit_and_its_fix(monkeypatch):
    """IMDSv2 required, and the token's reply dies one hop short of a bridged container: today's poller took
    the instance for no EC2 instance at all."""
    monkeypatch.setattr(spot, "REQUEST_TIMEOUT_SECONDS", 0.2)  # the token's PUT waits this long for its reply
    with MetadataServer() as server:
        server.put_hangs = True
        poller = SpotNotice("aws", server.url, poll_seconds=0.01)
        with pytest.warns(UserWarning) as warned:
            poller.start()
            try:
                _wait_for(lambda: len(server.statuses("GET", "/latest/meta-data/")) >= 2)
                assert poller._thread.is_alive() and poller.notice is None  # still polling, quietly
            finally:
                poller.stop()
        assert set(server.statuses("GET", "/latest/meta-data/")) == {401}  # tokenless: EC2 all the same
        assert set(server.statuses("PUT", "/latest/api/token")) == {0}
    ours = _spot_warnings(warned)
    assert len(ours) == 1 and "\n" not in ours[0], ours
    message = ours[0]
    assert f"{server.url}/latest/api/token" in message and "hop limit" in message
    assert ("aws ec2 modify-instance-metadata-options --instance-id INSTANCE_ID --http-put-response-hop-limit 2 "
            "--http-endpoint enabled" in message) and "host networking" in message
    assert "needs to run on" not in message and "no spot notice can be read" in message


def test_in_a_container_where_imdsv1_is_allowed_the_notice_is_read_without_a_token(monkeypatch):
    monkeypatch.setattr(spot, "REQUEST_TIMEOUT_SECONDS", 0.2)
    heard = []
    with MetadataServer() as server:
        server.put_hangs, server.imdsv1 = True, True  # the instance's http-tokens: optional
        poller = SpotNotice("aws", server.url, poll_seconds=0.01)
        with pytest.warns(UserWarning) as warned:
            poller.start(on_notice=heard.append)
            try:
                _wait_for(lambda: len(server.statuses("GET", AWS_PATH)) >= 3)
                assert poller.notice is None
                server.preempted = True
                _wait_for(lambda: poller.notice is not None)
            finally:
                poller.stop()
        assert heard == [AWS_NOTICE]
        assert server.statuses("PUT", "/latest/api/token") == [0]  # asked once; no token from then on
    ours = _spot_warnings(warned)
    assert len(ours) == 1 and "hop limit" in ours[0] and "polled without a token (IMDSv1)" in ours[0], ours


def test_a_notice_stops_the_run_with_exit_0_and_says_so_at_once(capsys):
    with MetadataServer() as server:
        policy = StopPolicy(Dist(), CPU, spot=SpotNotice("gcp", server.url, poll_seconds=0.02))
        with policy:
            assert policy.after_step(1) is None
            server.preempted = True
            _wait_for(lambda: policy.spot.notice is not None)
            stopping = policy.after_step(2)
        assert policy.spot._thread is None  # stopped with the policy
    assert stopping.exit_code == 0 and str(stopping) == GCP_NOTICE
    assert capsys.readouterr().err == f"{GCP_NOTICE}; stopping after this step and saving last.pt\n"


def test_a_signal_with_a_notice_stops_as_the_signal():
    with MetadataServer() as server:
        server.preempted = True
        with StopPolicy(Dist(), CPU, spot=SpotNotice("aws", server.url, poll_seconds=0.02)) as policy:
            _wait_for(lambda: policy.spot.notice is not None)
            signal.raise_signal(signal.SIGTERM)
            stopping = policy.after_step(1)
    assert stopping.exit_code == 128 + signal.SIGTERM and str(stopping) == "received SIGTERM"


def test_only_local_rank_0_polls_and_other_ranks_hear_of_the_notice_at_the_agreement():
    with MetadataServer() as server:
        server.preempted = True
        # A second process on the node: it leaves the metadata service to local rank 0.
        with StopPolicy(Dist(rank=1, local_rank=1, world_size=2), CPU,
                        spot=SpotNotice("aws", server.url, poll_seconds=0.02)) as policy:
            time.sleep(0.2)
            # An agreement step; with no process group here the agreement is this rank's own flag: no notice.
            assert policy.after_step(10) is None
        assert server.requests == []


def test_config_fields_default_off_and_bad_values_are_one_line_errors():
    assert spot_notice_for(load_config().train) is None
    aws = spot_notice_for(load_config(None, ["train.spot_notice=aws"]).train)
    assert aws.url == "http://169.254.169.254" + AWS_PATH and aws.poll_seconds == 5.0  # built, never started
    gcp = spot_notice_for(load_config(None, ["train.spot_notice=gcp", "train.spot_metadata_url=http://10.0.0.9/",
                                             "train.spot_poll_seconds=1"]).train)
    assert gcp.url == "http://10.0.0.9" + GCP_PATH and gcp.poll_seconds == 1.0
    assert spot.DEFAULT_BASE_URLS["gcp"] == "http://metadata.google.internal"
    for override, message in [("train.spot_notice=azure", "choose aws or gcp"),
                              ("train.spot_poll_seconds=0", "give seconds between looks"),
                              ("train.spot_metadata_url=169.254.169.254", "give an http:// address")]:
        with pytest.raises(ConfigError, match=message) as error:
            load_config(None, [override])
        assert "\n" not in str(error.value)


def _spot_settings(server: MetadataServer) -> list[str]:
    return ["--set", "train.spot_notice=aws", "--set", f"train.spot_metadata_url={server.url}",
            "--set", "train.spot_poll_seconds=0.2"]


def test_a_notice_mid_run_checkpoints_exits_0_and_a_new_machine_resumes_from_the_mirror(tiny_data, tmp_path):
    bucket, first, second = tmp_path / "bucket", tmp_path / "first-machine", tmp_path / "second-machine"
    with MetadataServer() as server:
        args = tiny_train_args(tiny_data, first, "--epochs", "50", "--mirror", str(bucket), *_spot_settings(server))
        proc = subprocess.Popen([sys.executable, "-m", "imagenet_resnet", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        watchdog = threading.Timer(120, proc.kill)  # a run that ignores the notice would train 50 epochs
        watchdog.start()
        output = []
        for line in proc.stdout:
            output.append(line)
            if " step 3/" in line:  # a few steps in: the instance gets its notice
                server.preempted = True
                break
        output.append(proc.stdout.read())
        watchdog.cancel()
        assert proc.wait() == 0, "".join(output)
    text = "".join(output)
    assert text.count(f"{AWS_NOTICE}; stopping after this step and saving last.pt") == 1
    saved = re.search(rf"{AWS_NOTICE}: saved \S*last.pt at .*\(global step (\d+)\); run the same command with "
                      "--resume", text)
    assert saved, text
    stopped_at = int(saved[1])
    state = checkpoint.load(first / "last.pt")
    assert state["progress"]["global_step"] == stopped_at and 3 <= stopped_at < 50 * STEPS_PER_EPOCH
    assert f"is up to date (checkpoint at global step {stopped_at})" in text  # the mirror flushed before the exit
    shutil.rmtree(first)  # the instance is gone, and its disk with it

    epochs = state["progress"]["epoch"] + 1
    with MetadataServer() as server:  # the new instance's metadata service: no notice
        done = run_cli(*tiny_train_args(tiny_data, second, "--epochs", str(epochs), "--mirror", str(bucket),
                                        "--resume", *_spot_settings(server)))
        assert server.statuses("GET", AWS_PATH)  # it watched, and heard nothing
    assert "restored" in done.stdout and f"(global step {stopped_at})" in done.stdout
    assert checkpoint.load(second / "last.pt")["progress"]["global_step"] == epochs * STEPS_PER_EPOCH
    assert "interruption notice" not in done.stdout + done.stderr
