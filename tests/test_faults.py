"""The fault suite's short version (benchmarks/faults.py runs each with more faults): kills, a kill inside a
checkpoint write, damaged checkpoints, a full disk, a killed prepare, files damaged after prepare, a killed
loader worker, untrusted checkpoints, a resume on another process count from the bucket, a zombie writer, a spot
notice. Real processes, killed for real; a fault counts only where it landed inside the work it claims to
interrupt, and each must recover with nothing lost, going on from where the fault left the work."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faults  # noqa: E402 (the benchmark's own scenarios, run here with fewer faults)


def _all_recovered(rows):
    """The benchmark's own verdict: at least one fault counted, every random fault asked for counted (landed
    inside the work it claims to interrupt), and every fault recovered from, resuming where it left the work."""
    for row in rows:
        assert faults.shortfall(row) is None, (faults.shortfall(row), row)
        assert row.get("drawn", row["tried"]) >= row["tried"], row


def test_a_report_that_counted_no_fault_too_few_or_saw_a_failure_is_a_failure():
    assert faults.shortfall({"tried": 0, "recovered": 0}) == "no fault counted of 0 drawn"
    assert faults.shortfall({"asked": 2, "drawn": 5, "tried": 1, "recovered": 1}) == (
        "only 1 of the 2 faults asked for counted (5 drawn)")
    assert faults.shortfall({"asked": 2, "tried": 2, "recovered": 1}) == "recovered from 1 of 2"
    assert faults.shortfall({"asked": 2, "drawn": 3, "tried": 2, "recovered": 2, "failures": ["resumed wrongly"]}) == (
        "recovered from 2 of 2\n  resumed wrongly")
    assert faults.shortfall({"asked": 2, "drawn": 3, "tried": 2, "recovered": 2, "failures": []}) is None
    table = faults.markdown([{"fault": "f", "injected": "i", "asked": 2, "drawn": 3, "tried": 2, "recovered": 2,
                              "detail": "d"}])
    assert table.splitlines()[0].startswith("| fault | how it is injected | drawn | counted |")
    assert table.splitlines()[2] == "| f | i | 3 | 2 | 2 | d |"


RESUMED = "12:00:01 resumed /tmp/run/{file} at epoch 2/2, after step {k}/7 (global step {step})\n"


def test_a_start_after_a_fault_must_resume_at_the_newest_checkpoints_step():
    """The verdict must be able to fail: training is deterministic, so a --resume that began again at step 0 (or
    from an older checkpoint) ends bitwise equal all the same; only the step it says it resumed at tells."""
    plan = "12:00:02 resnet18 (width 8) | ... | global batch 16\n"
    assert faults.resume_failure(RESUMED.format(file="last.pt", k=3, step=10) + plan, 10) is None
    assert faults.resume_failure(RESUMED.format(file="previous.pt", k=3, step=10) + plan, 10) is None
    from_scratch = "12:00:01 --resume: no /tmp/run/last.pt yet, starting a new run\n" + plan
    assert "began again at step 0" in faults.resume_failure(from_scratch, 10)
    assert faults.resume_failure(from_scratch, None) is None  # killed before any checkpoint: a new run is right
    assert "not at 10" in faults.resume_failure(RESUMED.format(file="previous.pt", k=1, step=8) + plan, 10)
    assert "not at 10" in faults.resume_failure(RESUMED.format(file="last.pt", k=5, step=12) + plan, 10)
    assert "where no checkpoint was left" in faults.resume_failure(RESUMED.format(file="last.pt", k=3, step=10), None)


def test_a_prepare_after_a_kill_must_keep_the_shards_the_kill_left():
    left = faults._Shards({"train-00000": ((1, 5), (2, 6)), "train-00001": ((3, 7), (4, 8))})
    left.staged = True  # in the staging folder: a packing under way
    finished = {**left, "train-00002": ((9, 9), (10, 10)), "val-00000": ((11, 11), (12, 12))}
    kept = "  train: 2 of 8 shards already written; resuming\n"
    assert faults.packing_resume_failure(kept, left, finished) is None
    assert faults.packing_resume_failure(None, left, finished) is None  # killed again: only the files tell
    assert faults.packing_resume_failure("", None, finished) is None  # killed before packing began
    again = {**finished, "train-00001": ((13, 13), (4, 8))}  # the shard's .bin written anew
    assert "wrote again 1 of the 2 shards" in faults.packing_resume_failure(kept, left, again)
    assert "wrote again" in faults.packing_resume_failure(None, left, again)
    assert "where the kill left {'train': 2}" in faults.packing_resume_failure("", left, finished)
    assert faults.packing_resume_failure("  train: 1 of 8 shards already written; resuming\n", left, finished)
    in_place = faults._Shards(finished)  # the kill came after the switch: a finished folder, kept without a word
    assert faults.packing_resume_failure("", in_place, finished) is None
    assert faults.packing_resume_failure(kept, in_place, finished)


@pytest.mark.parametrize("variant", list(faults.VARIANTS))
def test_kill_9_at_random_moments_then_resume_ends_bitwise_equal(tmp_path, tiny_data, variant):
    _all_recovered([faults.random_kills(tmp_path, tiny_data, variant, kills=2, rng=random.Random(1), epochs=2)])


def test_kill_9_inside_a_checkpoint_write(tmp_path, tiny_data):
    _all_recovered([faults.kill_inside_checkpoint_write(tmp_path, tiny_data, tries=2, rng=random.Random(2))])


def test_damaged_checkpoints_fall_back_or_stop_in_one_line(tmp_path, tiny_data):
    _all_recovered(faults.damaged_checkpoints(tmp_path, tiny_data))


def test_a_full_disk_loses_nothing(tmp_path, tiny_data):
    _all_recovered(faults.full_disk(tmp_path, tiny_data))


def test_kill_9_of_prepare_then_prepare_again(tmp_path, tiny_data):
    _all_recovered([faults.killed_prepare(tmp_path, tiny_data, kills=3, rng=random.Random(3))])


def test_files_damaged_after_prepare_are_skipped_and_named(tmp_path, tiny_data):
    _all_recovered([faults.bad_files_after_prepare(tmp_path, tiny_data)])


def test_a_killed_loader_worker_stops_the_run_resumably(tmp_path, tiny_data):
    _all_recovered([faults.killed_worker(tmp_path, tiny_data)])


def test_untrusted_checkpoints_are_refused_unread(tmp_path, tiny_data):
    _all_recovered([faults.untrusted_checkpoints(tmp_path, tiny_data)])


@pytest.fixture(scope="module")
def faults_s3():
    """The fault suite's own S3 server (moto in a process group of its own), as the benchmark runs it."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with faults.s3_server() as fs:
        yield fs


@pytest.mark.parametrize("change", ["2 -> 1", "4 -> 2"])  # 1 -> 2 is the torchrun test's (test_distributed.py)
def test_kill_9_then_resume_on_another_process_count_from_the_bucket(tmp_path, tiny_data, faults_s3, change):
    _all_recovered([faults.resumed_on_another_split(tmp_path, tiny_data, change, 1, random.Random(4), faults_s3)])


def test_a_zombie_writer_stops_and_the_bucket_keeps_the_new_run(tmp_path, tiny_data, faults_s3):
    row = faults.zombie_writer(tmp_path, tiny_data, 1, faults_s3)
    assert row["failures"] == []
    _all_recovered([row])


def test_a_spot_notice_ends_the_run_cleanly_and_a_new_machine_resumes(tmp_path, tiny_data, faults_s3):
    row = faults.spot_notices(tmp_path, tiny_data, 1, random.Random(5), faults_s3)
    assert row["failures"] == []
    _all_recovered([row])
