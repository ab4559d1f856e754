"""The fault suite's short version (benchmarks/faults.py runs each with more faults): kills, a kill inside a
checkpoint write, damaged checkpoints, a full disk, a killed prepare, files damaged after prepare, a killed
loader worker, untrusted checkpoints, a resume on another process count from the bucket, a zombie writer, a spot
notice. Real processes, killed for real; each must recover with nothing lost."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faults  # noqa: E402 (the benchmark's own scenarios, run here with fewer faults)


def _all_recovered(rows):
    """The benchmark's own verdict: at least one fault injected, every random kill asked for landed (during the
    work, never during start-up), and every fault recovered from."""
    for row in rows:
        assert faults.shortfall(row) is None, (faults.shortfall(row), row)


def test_a_report_that_injected_nothing_or_too_few_kills_is_a_failure():
    assert faults.shortfall({"tried": 0, "recovered": 0}) == "no fault was injected"
    assert faults.shortfall({"asked": 2, "tried": 1, "recovered": 1}) == "only 1 of the 2 kills asked for landed"
    assert faults.shortfall({"asked": 2, "tried": 2, "recovered": 1}) == "recovered from 1 of 2"
    assert faults.shortfall({"asked": 2, "tried": 2, "recovered": 2}) is None


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
