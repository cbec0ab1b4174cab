"""`python -m bench flink-restore [--failures 10]`: a crashed Flink job RUNNING again from its checkpoint.

On a real Flink 2.3 session cluster (tests/flink_cluster.py) the CountingJob runs, completes a
checkpoint, and is failed for real (its fail file; restart strategy none keeps it FAILED). The
clock starts when Flink reports the job FAILED (what the FlinkJobFailed alert reports) and stops
when Flink reports the new job's tasks all RUNNING, restored from the failed job's latest
completed checkpoint (``latest.restored`` checked every time). The two ways alternate, so both
see the same machine load:

    runbook   the flink-job-crashed flow, called in-process (a Prefect test server records it):
              finds the job, the checkpoint and the jar, checks slots, resubmits, verifies
    CLI       what a person runs, as fast as a script can: look the checkpoint up with the REST
              API (GET /jobs/overview, GET /jobs/:id/checkpoints), then
              `bin/flink run -d -m host:port -s <checkpoint> -c <class> <jar> <args>`, then poll
              until the tasks run. Typing and reading time are not counted.

Prints p50 and p90 of each and the ratio (runbook / CLI); the alert's own delivery is measured
by `python -m bench trigger-latency`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.stack import percentile

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench flink-restore")
    parser.add_argument("--failures", type=int, default=10, help="failures restored per way")
    args = parser.parse_args(argv)

    from prefect.testing.utilities import prefect_test_harness

    from blocks.flink import FlinkCluster
    from flows.flink.flink_job_crashed import FlinkJobCrashedParams, flink_job_crashed
    from runbooks.params import SafetyParams
    from tests.flink_cluster import (
        COUNTING_JOB_CLASS,
        JAVA_HOME,
        build_counting_job,
        counting_args,
        start_flink,
    )

    base = Path(tempfile.mkdtemp(prefix="bench-flink-"))
    name = "bench-enrichment"
    fail = base / "fail"
    job_args = counting_args(name, base / "out", rate=40, keys=8, fail_file=fail)
    jar = build_counting_job()
    cluster = start_flink()
    print(f"Flink at {cluster.rest_url}, logs in {cluster.log_dir}")
    times: dict[str, list[float]] = {"runbook": [], "CLI": []}
    try:
        with prefect_test_harness(server_startup_timeout=120):
            FlinkCluster(rest_url=cluster.rest_url, request_timeout_s=10).save(
                "bench-flink", overwrite=True
            )
            params = FlinkJobCrashedParams(
                flink_block="bench-flink",
                job_name=name,
                jar=jar.name,
                entry_class=COUNTING_JOB_CLASS,
                program_args=job_args,
                topic=None,
                running_deadline_s=60,
                poll_interval_s=0.2,
                slot_wait_s=30,
                safety=SafetyParams(budget_max_actions=1000),
            )
            jar_id = cluster.counting_jar()
            jid = cluster.submit(jar_id, job_args, parallelism=2)
            for i in range(2 * args.failures):
                way = "runbook" if i % 2 == 0 else "CLI"
                cluster.wait_for_state(jid, "RUNNING", timeout_s=60)
                cluster.wait_for_checkpoints(jid, completed=1, timeout_s=60)
                fail.touch()
                cluster.wait_for(
                    lambda jid=jid: cluster.job(jid)["state"],
                    lambda s: s == "FAILED",
                    timeout_s=30,
                    interval_s=0.05,
                    what=f"{jid} FAILED",
                )
                started = time.monotonic()
                fail.unlink()
                if way == "runbook":
                    state = flink_job_crashed(params=params, return_state=True)
                    if not state.is_completed():
                        raise RuntimeError(f"runbook run {state.name}: {state.message}")
                    new = state.result().restored_job_id
                else:
                    new = _cli_restore(cluster, jar, job_args, JAVA_HOME)
                cluster.wait_for_state(new, "RUNNING", timeout_s=60)
                elapsed = time.monotonic() - started
                # the failed job's final latest checkpoint (one may complete after FAILED)
                expected = cluster.checkpoints(jid)["latest"]["completed"]["external_path"]
                restored = cluster.checkpoints(new)["latest"]["restored"]
                if not restored or restored["external_path"] != expected:
                    raise RuntimeError(f"{way}: {new} restored from {restored}, not {expected}")
                times[way].append(elapsed)
                print(f"  {i + 1:2}/{2 * args.failures} {way:7} {elapsed:6.2f} s  ({new})")
                jid = new
    finally:
        cluster.stop()

    rows = [(way, percentile(t, 50), percentile(t, 90)) for way, t in times.items()]
    print(
        f"\nalert (job FAILED) -> job RUNNING again from its checkpoint, {args.failures} failures each\n"
    )
    print(f"| {'way':41} |    p50 |    p90 |")
    print(f"|{'-' * 43}|--------|--------|")
    labels = {
        "runbook": "flink-job-crashed runbook",
        "CLI": "REST look-up + `flink run -s` (no typing)",
    }
    for way, p50, p90 in rows:
        print(f"| {labels[way]:41} | {p50:5.2f}s | {p90:5.2f}s |")
    ratio = rows[0][1] / rows[1][1]
    print(f"\nratio runbook / CLI (p50): {ratio:.2f}")
    return 0


def _cli_restore(cluster, jar: Path, job_args: list[str], java_home: Path) -> str:
    """The person's path: find the FAILED job and its checkpoint over REST, `flink run -s` it."""
    rest = cluster.rest_url
    jobs = httpx.get(f"{rest}/jobs/overview", timeout=10).json()["jobs"]
    name = job_args[job_args.index("--name") + 1]
    failed = max(
        (j for j in jobs if j["name"] == name and j["state"] == "FAILED"),
        key=lambda j: j["start-time"],
    )
    # as the runbook does: a checkpoint still in progress may complete after the failure
    deadline = time.monotonic() + 10
    while True:
        checkpoints = httpx.get(f"{rest}/jobs/{failed['jid']}/checkpoints", timeout=10).json()
        if not checkpoints["counts"]["in_progress"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    path = checkpoints["latest"]["completed"]["external_path"]
    env = {
        **os.environ,
        "JAVA_HOME": str(java_home),
        "FLINK_CONF_DIR": str(cluster.conf_dir),
        "FLINK_LOG_DIR": str(cluster.log_dir),
    }
    out = subprocess.run(
        [
            str(cluster.home / "bin" / "flink"),
            "run",
            "-d",
            "-m",
            f"127.0.0.1:{cluster.rest_port}",
            "-s",
            path,
            "-p",
            "2",
            "-c",
            "runbooks.tests.CountingJob",
            str(jar),
            *job_args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # "Job has been submitted with JobID <hex>"
    for line in out.stdout.splitlines():
        if "JobID" in line:
            return line.rsplit(" ", 1)[-1].strip()
    raise RuntimeError(
        f"flink run failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}"
    )
