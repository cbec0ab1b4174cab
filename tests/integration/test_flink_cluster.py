"""The real Flink session cluster the Flink runbooks are tested against (tests/flink_cluster.py):
the test job runs, checkpoints complete, its keyed counter grows, a fail file fails it for good,
and a TaskManager killed with SIGKILL comes back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import unique
from tests.flink_cluster import FlinkTestCluster, counting_args, read_counts

pytestmark = pytest.mark.integration


def test_counting_job_checkpoints_and_counts(
    flink_cluster: FlinkTestCluster, tmp_path: Path
) -> None:
    name = unique("counting")
    out, fail = tmp_path / "out", tmp_path / "fail"
    jar = flink_cluster.counting_jar()
    assert jar in {j["id"] for j in flink_cluster.jars()}
    try:
        jid = flink_cluster.submit(
            jar, counting_args(name, out, keys=3, fail_file=fail), parallelism=2
        )
        job = flink_cluster.wait_for_state(jid, "RUNNING")
        assert job["name"] == name and [v["parallelism"] for v in job["vertices"]] == [2, 2]
        stats = flink_cluster.wait_for_checkpoints(jid, completed=2)
        completed = stats["latest"]["completed"]
        assert completed["status"] == "COMPLETED"
        assert Path(completed["external_path"].removeprefix("file:")).is_dir()
        first = {k: v[-1] for k, v in read_counts(out).items()}
        assert set(first) == {0, 1, 2}
        flink_cluster.wait_for(
            lambda: read_counts(out),
            lambda c: all(c[k][-1] > first[k] for k in first),
            timeout_s=20,
            what="counts growing",
        )
        # per key the counts go 1, 2, 3... with nothing skipped or repeated
        for counts in read_counts(out).values():
            assert counts == list(range(1, len(counts) + 1))

        fail.touch()
        flink_cluster.wait_for_state(jid, "FAILED", timeout_s=30)
        # restart strategy none: it stays FAILED, its last checkpoint retained
        assert flink_cluster.job(jid)["state"] == "FAILED"
        retained = flink_cluster.checkpoints(jid)["latest"]["completed"]["external_path"]
        assert Path(retained.removeprefix("file:")).is_dir()
    finally:
        flink_cluster.cancel_all()


def test_taskmanager_kill_fails_the_job_and_restart_brings_slots_back(
    flink_cluster: FlinkTestCluster, tmp_path: Path
) -> None:
    jar = flink_cluster.counting_jar()
    try:
        jid = flink_cluster.submit(jar, counting_args(unique("counting"), tmp_path / "out"))
        flink_cluster.wait_for_state(jid, "RUNNING")
        flink_cluster.kill_taskmanager()
        flink_cluster.wait_for_state(jid, "FAILED", timeout_s=30)
        flink_cluster.wait_for_taskmanagers(0, timeout_s=30)
        flink_cluster.start_taskmanager()
        overview = flink_cluster.get("/overview")
        assert (overview["taskmanagers"], overview["slots-available"]) == (1, 4)
    finally:
        flink_cluster.cancel_all()
