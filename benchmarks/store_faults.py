"""The fault suite's store rows: real mirrored trainer processes against a store that fails as a cloud's does,
through tests/s3_fault_proxy.py in front of moto's standalone server (both on loopback, each a process group of
its own): replies lost after the write was applied, replies delayed, 409/412/503 answers, and a store that
ignores conditional writes. Each row has the shape of benchmarks/faults.py's; a try counts only when the proxy
recorded that its fault landed (a reply dropped after the store applied the write, an answer given, a condition
stripped) while the trainer ran.

    python benchmarks/store_faults.py [--tries 3] [--json FILE]

benchmarks/faults.py runs them in its suite: rows(work, data, tries, _train_command).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_fault_proxy import moto_behind_proxy  # noqa: E402 (tests/: the proxy and the store behind it)

from imagenet_resnet.errors import UserError  # noqa: E402
from imagenet_resnet.storage import mirror  # noqa: E402

BUCKET = "store-faults"
# --lease-timeout: renewed every 2 s, stale after 8 s without one (longer than botocore's own retries of a 503 take)
LEASE_TIMEOUT = 8.0
EPOCHS = 1000  # more than any try needs: each run trains until its checks are done, then gets SIGTERM (a stop)
SETTINGS = ["train.checkpoint_every_steps=1"]
# benchmarks/faults.py's _train_command(data, out, settings, epochs)
TrainCommand = Callable[[Path, Path, list, int], list]


def _fs():
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.invalidate_cache()
    return fs


def _json(fs, key: str) -> dict:
    try:
        return json.loads(fs.cat_file(f"{BUCKET}/{key}"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    return code, log.read_text()


def _watched_run(proxy, work: Path, data: Path, name: str, faults: list[dict], landed: Callable[[list], bool],
                 train_command: TrainCommand) -> dict:
    """One mirrored trainer with `faults` set on the proxy. While it runs: the lease's heartbeat age sampled
    every 0.2 s; half a lease after the faults landed (`landed` of the proxy's record), a second trainer's start
    (a Mirror taking the lease with --resume, as `train` does) that must be refused; a lease and a second after
    the faults (time for a lease gone stale to show), SIGTERM, and the run checkpoints, drains its uploads and
    stops. Returns what was seen; it counts ("landed") only when the faults landed and the second start was tried
    while the trainer still ran."""
    url, out = f"s3://{BUCKET}/{name}", work / name
    proxy.set_rules(faults + [{"action": "pass", "method": "PUT", "key": "lease.json"},
                              {"action": "pass", "method": "PUT", "key": ".pt"}])
    fs = _fs()
    proc = _start(train_command(data, out, SETTINGS, EPOCHS) + ["--mirror", url, "--lease-timeout", str(LEASE_TIMEOUT)],
                  work / f"{name}.log")
    ages, second, landed_at, started, stopped = [], None, None, time.monotonic(), False
    while proc.poll() is None:
        heartbeat = _json(fs, f"{name}/lease.json").get("heartbeat")
        if heartbeat is not None:
            ages.append(time.time() - heartbeat)
        if landed_at is None and landed(proxy.events()):
            landed_at = time.monotonic()
        if landed_at is not None and second is None and time.monotonic() - landed_at > LEASE_TIMEOUT / 2:
            try:
                mirror.Mirror(url, work / f"{name}-second", lease_seconds=LEASE_TIMEOUT).take_lease(True, False)
                second = "took the lease"
            except UserError as e:
                second = "refused" if "is being written by another trainer" in str(e) else str(e)
            if proc.poll() is not None:  # ended meanwhile (its lease given up): the check proves nothing
                second = "the run ended first"
        waited = time.monotonic() - (landed_at if landed_at is not None else started)
        if not stopped and waited > (LEASE_TIMEOUT + 1 if landed_at is not None else 120):
            proc.send_signal(signal.SIGTERM)
            stopped = True
        time.sleep(0.2)
    code, output = _finish(proc, work / f"{name}.log")
    events = proxy.events()
    lease_puts = [e for e in events if e["path"].endswith("/lease.json")]
    checkpoint_puts = [e["path"] for e in events if e["path"].endswith(".pt") and e["status"] == 200]
    return {"code": code, "output": output, "events": events,
            "landed": landed(events) and second not in (None, "the run ended first"),
            "max_age": max(ages, default=0.0), "second": second, "seconds": time.monotonic() - started,
            "lease_puts": len(lease_puts), "checkpoints_twice": len(checkpoint_puts) - len(set(checkpoint_puts)),
            "bucket_up_to_date": code == 128 + signal.SIGTERM
            and _json(fs, f"{name}/checkpoints.json").get("last", {}).get("sha256") == _sha(out / "last.pt")}


def _checks(seen: dict, warning_allowed: bool = False) -> dict[str, bool]:
    # A renewal every LEASE_TIMEOUT / 4 s, a retry of each lost or refused one, and slack for the start and end.
    paced = seen["lease_puts"] <= 2 * seen["seconds"] / (LEASE_TIMEOUT / 4) + 6
    checks = {"stopped by SIGTERM (exit 143), no traceback": seen["code"] == 128 + signal.SIGTERM
              and "Traceback" not in seen["output"],
              f"the lease never stale (heartbeat at most {seen['max_age']:.1f} s old)": seen["max_age"] < LEASE_TIMEOUT,
              f"renewals paced ({seen['lease_puts']} in {seen['seconds']:.0f} s)": paced,
              f"a second trainer refused meanwhile ({seen['second']})": seen["second"] == "refused",
              "the bucket names its last.pt": seen["bucket_up_to_date"]}
    if not warning_allowed:
        checks["no upload failed, none repeated"] = ("mirror: warning" not in seen["output"]
                                                     and not seen["checkpoints_twice"])
    return checks


def _row(fault: str, injected: str, detail: str, asked: int, drawn: int, outcomes: list[tuple[str, dict]]) -> dict:
    """outcomes: (try name, checks) of each try that counted (of `drawn` made)."""
    failures = [f"{name}: not {', '.join(check for check, ok in checks.items() if not ok)}"
                for name, checks in outcomes if not all(checks.values())]
    return {"fault": fault, "injected": injected, "asked": asked, "drawn": drawn, "tried": len(outcomes),
            "recovered": len(outcomes) - len(failures), "failures": failures, "detail": detail}


def _actions(events: list, action: str, key: str, status: int | None = None) -> int:
    return sum(e["action"] == action and e["path"].endswith(key) and status in (None, e["status"]) for e in events)


def lost_replies(work: Path, data: Path, tries: int, proxy, train_command: TrainCommand) -> dict:
    """Replies lost after the store applied the write: two lease writes (the first try's the take itself) and one
    pointer update per try."""
    outcomes, drawn = [], 0
    for k in range(3 * tries):  # a try whose run ended before its check counts for nothing: draw another
        if len(outcomes) == tries:
            break
        drawn += 1
        faults = [{"action": "drop", "method": "PUT", "key": "lease.json", "skip": k % 3, "times": 2},
                  {"action": "drop", "method": "PUT", "key": "checkpoints.json", "skip": 2 + k, "times": 1}]
        # Counted from the first lost lease reply on: a writer wedged by it never has a second write applied.
        seen = _watched_run(proxy, work, data, f"lost-{k}", faults, lambda events: _actions(
            events, "drop", "lease.json", 200) >= 1 and _actions(events, "drop", "checkpoints.json", 200) == 1,
            train_command)
        if seen["landed"]:
            outcomes.append((f"try {k}", _checks(seen)))
    return _row("replies lost after the store applied the write (the lease's, the pointer's)",
                "the fault proxy forwards the PUT, the store applies it, the proxy closes the connection unanswered "
                "(botocore sends it again with the same If-Match or If-None-Match); 2 lease writes (the first try's "
                f"first: the take) and 1 pointer update per try; --lease-timeout {LEASE_TIMEOUT:g}",
                "stopped by SIGTERM with no traceback; the lease never stale and renewed on schedule; a second "
                "trainer refused meanwhile; the bucket names the run's last.pt; no upload warning, no checkpoint uploaded twice", tries, drawn,
                outcomes)


def delayed_replies(work: Path, data: Path, tries: int, proxy, train_command: TrainCommand,
                    seconds: float = 1.5) -> dict:
    outcomes, drawn = [], 0
    for k in range(3 * tries):
        if len(outcomes) == tries:
            break
        drawn += 1
        faults = [{"action": "delay", "seconds": seconds, "method": "PUT", "key": key, "skip": 1 + k, "times": 3}
                  for key in ("lease.json", "checkpoints.json")]
        seen = _watched_run(proxy, work, data, f"delay-{k}", faults, lambda events: _actions(
            events, "delay", "lease.json") == 3 and _actions(events, "delay", "checkpoints.json") == 3, train_command)
        if seen["landed"]:
            outcomes.append((f"try {k}", _checks(seen)))
    return _row(f"replies delayed by {seconds:g} s (a slow store)",
                f"the fault proxy holds the reply to 3 lease renewals and 3 pointer updates per try for {seconds:g} s; "
                f"--lease-timeout {LEASE_TIMEOUT:g} (renewed every {LEASE_TIMEOUT / 4:g} s)",
                "as for lost replies", tries, drawn, outcomes)


ANSWERS = {409: "ConditionalRequestConflict", 412: "PreconditionFailed", 503: "SlowDown"}


def store_answers(work: Path, data: Path, tries: int, proxy, train_command: TrainCommand) -> list[dict]:
    """409 (two conditional writes raced), 412 (the store says the version changed; it did not), 503 (slow down),
    answered by the proxy without forwarding: 2 lease renewals and 2 pointer updates per try. A 409 that never ends
    at the start must be said in one line."""
    rows = []
    for status, code in ANSWERS.items():
        outcomes, drawn = [], 0
        for k in range(3 * tries):
            if len(outcomes) == tries:
                break
            drawn += 1
            faults = [{"action": "answer", "status": status, "code": code, "method": "PUT", "key": key, "skip": 1 + k,
                       "times": 2} for key in ("lease.json", "checkpoints.json")]
            seen = _watched_run(proxy, work, data, f"answer-{status}-{k}", faults, lambda events: _actions(
                events, "answer", "lease.json") == 2 and _actions(events, "answer", "checkpoints.json") == 2,
                train_command)
            if not seen["landed"]:
                continue
            # A 412 where nothing changed makes the pointer's update read the store again and retry: one warning.
            checks = _checks(seen, warning_allowed=status == 412)
            if status == 409:
                checks["a 409 that never ends at the start said in one line"] = _persistent_conflict(
                    proxy, work, data, f"conflict-{k}", train_command)
            outcomes.append((f"try {k}", checks))
        rows.append(_row(f"the store answers {status} {code} to conditional writes",
                         f"the fault proxy answers {status} without forwarding to 2 lease renewals and 2 pointer "
                         f"updates per try; --lease-timeout {LEASE_TIMEOUT:g}"
                         + ("; and to every lease write of another run's start" if status == 409 else ""),
                         "stopped by SIGTERM with no traceback; the lease never stale; a second trainer refused "
                         "meanwhile; the bucket names the run's last.pt" + ("" if status == 412 else "; no upload warning")
                         + ("; the start under a lasting 409 refused in one line" if status == 409 else ""),
                         tries, drawn, outcomes))
    return rows


def _persistent_conflict(proxy, work: Path, data: Path, name: str, train_command: TrainCommand) -> bool:
    proxy.set_rules([{"action": "answer", "status": 409, "code": ANSWERS[409], "method": "PUT", "key": "lease.json"}])
    code, output = _finish(_start(train_command(data, work / name, SETTINGS, 1) + ["--mirror", f"s3://{BUCKET}/{name}"],
                                  work / f"{name}.log"), work / f"{name}.log")
    lines = output.strip().splitlines()
    return code == 2 and len(lines) == 1 and "answered 409 (ConditionalRequestConflict)" in lines[0] \
        and len(proxy.events()) == mirror.CONFLICT_ATTEMPTS


def ignored_conditions(work: Path, data: Path, tries: int, proxy, train_command: TrainCommand) -> dict:
    """A store that applies conditional writes as plain ones (GCS's S3 interface, MinIO before 2024): the start
    refused in one line naming --no-lease; then --no-lease trains and mirrors there, without a lease."""
    outcomes = []
    for k in range(tries):
        name, url = f"unconditional-{k}", f"s3://{BUCKET}/unconditional-{k}"
        proxy.set_rules([{"action": "ignore_conditions", "method": "PUT", "when": header}
                         for header in ("If-Match", "If-None-Match")])
        code, output = _finish(_start(train_command(data, work / f"{name}-refused", SETTINGS, 1) + ["--mirror", url],
                                      work / f"{name}-refused.log"), work / f"{name}-refused.log")
        if not proxy.events():
            continue
        lines = output.strip().splitlines()
        out = work / name
        command = train_command(data, out, SETTINGS, 1) + ["--mirror", url, "--no-lease"]
        no_lease, no_lease_output = _finish(_start(command, work / f"{name}.log"), work / f"{name}.log")
        fs = _fs()
        outcomes.append((f"try {k}", {
            "refused in one line naming --no-lease": code == 2 and len(lines) == 1
            and "does not honour conditional writes" in lines[0] and "--no-lease" in lines[0],
            "--no-lease trained, said so": no_lease == 0 and "no lease (--no-lease)" in no_lease_output,
            "the bucket names its last.pt, no lease there": _json(fs, f"{name}/checkpoints.json").get("last", {}).get(
                "sha256") == _sha(out / "last.pt") and not fs.exists(f"{BUCKET}/{name}/lease.json")}))
    return _row("a store that ignores conditional writes (GCS's S3 interface, MinIO before 2024)",
                "the fault proxy strips If-Match and If-None-Match from every PUT before the store sees it",
                "the start refused in one line naming --no-lease (its probe write applied where it must be refused); "
                "--no-lease then trains, says it runs without a lease, and mirrors the run", tries, tries, outcomes)


def rows(work: Path, data: Path, tries: int, train_command: TrainCommand) -> list[dict]:
    """Every store row, moto and the proxy started for them (and this process's AWS variables pointing there
    meanwhile)."""
    with moto_behind_proxy(BUCKET) as proxy:
        return [lost_replies(work, data, tries, proxy, train_command),
                delayed_replies(work, data, tries, proxy, train_command),
                *store_answers(work, data, tries, proxy, train_command),
                ignored_conditions(work, data, tries, proxy, train_command)]


def main() -> int:
    from faults import _train_command, markdown, shortfall  # faults.py imports this module: not at its top

    from imagenet_resnet.data.synthetic import make_shapes_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imagenet-resnet-store-faults-") as tmp:
        data = make_shapes_dataset(Path(tmp) / "shapes", train_per_class=12, val_per_class=4, size=40)
        work = Path(tmp) / "work"
        work.mkdir()
        found = rows(work, data, args.tries, _train_command)
    print(markdown(found))
    if args.json:
        record = {"command": " ".join(["python"] + sys.argv), "rows": found}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    failures = [f"{r['fault']}: {shortfall(r)}" for r in found if shortfall(r)]
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
