"""Watching for a spot instance's preemption notice (`train --spot-notice aws|gcp`), so that the run can
checkpoint and exit cleanly before the instance goes (training/stopping.py acts on it).

A daemon thread polls the instance metadata service every `poll_seconds`:
- AWS (IMDSv2): PUT /latest/api/token gives a session token; GET /latest/meta-data/spot/instance-action with it
  is 404 until a notice, then {"action": "terminate", "time": "..."}: about 2 minutes' warning.
- GCP: GET /computeMetadata/v1/instance/preempted (Metadata-Flavor: Google) says FALSE, then TRUE: about 30 s.
A metadata service that cannot be reached (the run is not on that cloud) gets one warning and quiet retries:
watching for a notice never stops the run. On AWS, a token whose reply never arrives while a tokenless GET is
answered means a container one network hop further than the instance's metadata hop limit (1 by default): the
warning says so and how to raise it, and where the instance allows IMDSv1 the notice is polled without a token.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
import warnings
from typing import Callable

from ..config import TrainConfig

PROVIDERS = ("aws", "gcp")
DEFAULT_BASE_URLS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal"}
CLOUD_NAMES = {"aws": "an AWS EC2", "gcp": "a Google Compute Engine"}
REQUEST_TIMEOUT_SECONDS = 2.0  # the metadata service answers in milliseconds; off that cloud nothing answers
AWS_TOKEN_TTL_SECONDS = 21600  # IMDSv2's maximum, 6 hours
AWS_TOKEN_REFRESH_MARGIN_SECONDS = 60.0  # a new token this long before the old one expires


class TokenReplyLost(OSError):
    """AWS's metadata service answers GETs, but the reply to the token's PUT never arrives here."""


class SpotNotice:
    """Polls the instance metadata service of `provider` ("aws" or "gcp") in a daemon thread once started.

    `notice` is None until the service announces the instance's preemption, then a one-line description of it
    ("AWS spot interruption notice: terminate at 08:22:00Z"); it never goes back to None. `base_url` replaces
    the provider's metadata address (tests, or a proxy)."""

    def __init__(self, provider: str, base_url: str = "", poll_seconds: float = 5.0):
        if provider not in PROVIDERS:
            raise ValueError(f"spot notice provider {provider!r}: choose {' or '.join(PROVIDERS)}")
        self.provider = provider
        self.base_url = (base_url or DEFAULT_BASE_URLS[provider]).rstrip("/")
        self.poll_seconds = poll_seconds
        self.notice: str | None = None
        self._warned = False  # the one warning about a service that cannot be read was given
        self._on_notice: Callable[[str], None] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._token, self._token_expires = "", 0.0
        self._tokenless = False  # AWS: no token's reply reaches this process, and the instance allows IMDSv1
        # Metadata addresses are link-local: an http_proxy from the environment must not carry these requests.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        """The address polled for the notice."""
        if self.provider == "aws":
            return f"{self.base_url}/latest/meta-data/spot/instance-action"
        return f"{self.base_url}/computeMetadata/v1/instance/preempted"

    def start(self, on_notice: Callable[[str], None] | None = None) -> None:
        """Poll in the background from now on; `on_notice(notice)` is called once, from the polling thread,
        when the notice arrives."""
        self._on_notice = on_notice
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"spot-notice-{self.provider}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            # A request in flight ends within its timeout; the thread is a daemon, so an exit never waits longer.
            self._thread.join(timeout=2 * REQUEST_TIMEOUT_SECONDS + 1)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                notice = self.check()
            except TokenReplyLost as e:
                self._warn_once(f"{e}; until then no spot notice can be read. Training goes on, and the service "
                                "is polled again quietly")
                notice = None
            except (OSError, http.client.HTTPException, ValueError) as e:
                # URLError and timeouts are OSErrors, a garbled answer a ValueError: none may end the watch
                reason = getattr(e, "reason", None) or e
                self._warn_once(f"cannot read {self.url} ({reason}); it needs to run on {CLOUD_NAMES[self.provider]} "
                                "instance (or train.spot_metadata_url set to its metadata service). Training goes "
                                "on, and the service is polled again quietly")
                notice = None
            if notice:
                self.notice = notice
                if self._on_notice is not None:
                    self._on_notice(notice)
                return  # a notice is final: nothing more to learn from the service
            self._stopping.wait(self.poll_seconds)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"--spot-notice {self.provider}: {message}")

    def check(self) -> str | None:
        """One look at the metadata service: the notice, or None. Raises OSError when it cannot be read."""
        if self.provider == "aws":
            return self._check_aws()
        with self._get(self.url, {"Metadata-Flavor": "Google"}) as response:
            preempted = response.read().decode(errors="replace").strip().upper() == "TRUE"
        return "GCP preemption notice: the instance stops in about 30 s" if preempted else None

    def _check_aws(self) -> str | None:
        for attempt in range(2):
            if not self._tokenless and (not self._token or time.monotonic() >= self._token_expires):
                self._new_aws_token()
            token = {} if self._tokenless else {"X-aws-ec2-metadata-token": self._token}
            try:
                with self._get(self.url, token) as response:
                    return _aws_notice(response.read())
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 404:  # no interruption scheduled
                    return None
                if e.code == 401 and attempt == 0:  # the token expired or was revoked, or IMDSv2 became required
                    self._token, self._tokenless = "", False
                    continue
                raise
        return None

    def _new_aws_token(self) -> None:
        request = urllib.request.Request(f"{self.base_url}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_SECONDS)})
        asked = time.monotonic()
        try:
            with self._opener.open(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
                self._token = response.read().decode().strip()
        except urllib.error.HTTPError:
            raise  # the service answered the PUT: a refusal, not a lost reply
        except (OSError, http.client.HTTPException) as lost:
            self._without_token(lost)
            return
        self._token_expires = asked + AWS_TOKEN_TTL_SECONDS - AWS_TOKEN_REFRESH_MARGIN_SECONDS

    def _without_token(self, lost: Exception) -> None:
        """The token's PUT got no reply: a tokenless GET (IMDSv1) tells an EC2 instance whose PUT reply dies on
        the way (a container one hop further than the hop limit; with IMDSv2 required the GET is refused with
        401) from no metadata service at all (the original error raised again)."""
        try:
            with self._get(f"{self.base_url}/latest/meta-data/", {}) as answer:
                status = answer.status
        except urllib.error.HTTPError as refused:
            refused.close()
            status = refused.code
        except (OSError, http.client.HTTPException):
            raise lost from None
        # AWS: "In a container environment, if the hop limit is 1, the IMDSv2 response does not return" (EC2
        # user guide, instance metadata access considerations); the hop limit is the PUT reply's IP TTL.
        cause = (f"{self.base_url}/latest/api/token never answers the token's PUT while {self.base_url}/latest/"
                 f"meta-data/ answers a GET ({status}): this is an EC2 instance, and the run is likely in a container "
                 "one network hop further than the instance's metadata hop limit (1 by default; AWS recommends 2 for "
                 "containers). Raise it: aws ec2 modify-instance-metadata-options --instance-id INSTANCE_ID "
                 "--http-put-response-hop-limit 2 --http-endpoint enabled, or run the container with host networking")
        if status != 200:  # 401: IMDSv2 required
            raise TokenReplyLost(cause)
        self._tokenless = True
        self._warn_once(f"{cause}. Meanwhile the notice is polled without a token (IMDSv1), which this instance allows")

    def _get(self, url: str, headers: dict[str, str]):
        return self._opener.open(urllib.request.Request(url, headers=headers), timeout=REQUEST_TIMEOUT_SECONDS)


def _aws_notice(body: bytes) -> str:
    """The notice in one line, from instance-action's JSON: {"action": "terminate", "time": "...T08:22:00Z"}."""
    try:
        fields = json.loads(body)
        action, when = fields["action"], str(fields["time"])
    except (ValueError, KeyError, TypeError):  # a notice all the same: the address answers only when there is one
        return f"AWS spot interruption notice: {body.decode(errors='replace').strip()[:100]}"
    return f"AWS spot interruption notice: {action} at {when.rsplit('T', 1)[-1]}"


def spot_notice_for(train_config: TrainConfig) -> SpotNotice | None:
    """The poller a TrainConfig asks for (train.spot_notice, spot_metadata_url, spot_poll_seconds), or None."""
    if not train_config.spot_notice:
        return None
    return SpotNotice(train_config.spot_notice, train_config.spot_metadata_url, train_config.spot_poll_seconds)
