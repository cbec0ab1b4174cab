"""`runbooks deploy` and `runbooks worker`: the runbooks on a team's Prefect server, run by workers.

    runbooks deploy --api-url http://prefect.internal:4200/api [--directory /srv/runbooks]
    runbooks worker --api-url http://prefect.internal:4200/api [--name worker-a]

`deploy` creates the `runbooks` work pool (process type) if it is missing, registers the project's
block types, and applies every deployment of prefect.yaml (the same names, parameters, tags,
schedules, triggers, concurrency and description as `runbooks up` serves) to that pool. Each
deployment pulls its code by changing into ``--directory`` (a checkout every worker's machine has at
that path; default: this checkout). Re-running it updates in place: the pool is kept, deployments
are upserted by name, schedules by slug and triggers by name (serving/triggers.py), so an alert
arriving meanwhile still finds its automation.

It also keeps one automation, "runbooks: crash flow runs without heartbeats", in place: a run
whose worker's machine died stays Running for ever otherwise (nothing else notices a process that
is gone). Every flow run sends a `prefect.flow-run.heartbeat` event every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (`runbooks worker` sets it to ``--heartbeat-seconds``);
the automation marks a run CRASHED once ``3 x`` that passed without one (Prefect's documented
"detect zombie flows" pattern). Runs that pause, suspend or end close the window.

`worker` runs our worker type, `runbooks-process` (serving/fast_worker.py: runs start on their
Scheduled event and fork from a warm interpreter, as under `runbooks up`), with that heartbeat
frequency and the watcher that resumes suspended approvals past their deadline (so they escalate).
`worker --stock` runs Prefect's own `prefect worker start --pool runbooks --type process` beside
that watcher instead: the same runs, only slower to start. Both serve the same `process` pool.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

HELP = "apply every runbook of prefect.yaml to a Prefect server's `runbooks` work pool"
WORKER_HELP = (
    "start a worker for the `runbooks` work pool (ours; --stock: Prefect's process worker)"
)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
POOL = "runbooks"
HEARTBEAT_SECONDS = 30  # Prefect 3.8.8's minimum (flows.heartbeat_frequency ge=30)
ZOMBIE_AUTOMATION = "runbooks: crash flow runs without heartbeats"
# any of these ends the wait for the next heartbeat (a paused or suspended run sends none)
_HEARTBEAT_OR_END = [
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.Paused",
    "prefect.flow-run.Suspended",
]


def add_arguments(deploy: argparse.ArgumentParser, worker: argparse.ArgumentParser) -> None:
    for parser in (deploy, worker):
        parser.add_argument(
            "--api-url",
            default=os.environ.get("PREFECT_API_URL"),
            help="the Prefect API (default: PREFECT_API_URL)",
        )
        parser.add_argument(
            "--heartbeat-seconds",
            type=int,
            default=HEARTBEAT_SECONDS,
            help="flow-run heartbeat interval the workers use (>= 30); the zombie-run "
            "automation crashes a run after 3 intervals without one",
        )
    deploy.add_argument(
        "--directory",
        default=str(PROJECT_ROOT),
        help="where the checkout is on the workers' machines (default: this checkout)",
    )
    deploy.add_argument(
        "--no-heartbeat-automation",
        action="store_true",
        help="do not install the automation that crashes runs whose heartbeats stopped",
    )
    worker.add_argument("--name", default=None, help="the worker's name (default: Prefect's)")
    worker.add_argument(
        "--work-queue",
        action="append",
        default=None,
        help="work queue(s) to poll (default: all of the pool's)",
    )
    worker.add_argument(
        "--stock",
        action="store_true",
        help="run Prefect's stock process worker (`prefect worker start --type process`) "
        "instead of ours: runs start at its next poll, each in a fresh interpreter",
    )


def _api_url(args: argparse.Namespace) -> str:
    if not args.api_url:
        raise SystemExit("give --api-url or set PREFECT_API_URL (e.g. http://host:4200/api)")
    if args.heartbeat_seconds < 30:
        raise SystemExit("--heartbeat-seconds must be at least 30 (Prefect's minimum)")
    return args.api_url.rstrip("/")


class WorkingDirectory:
    """Runner storage whose pull step only changes into a directory that already holds the code
    (``prefect.deployments.steps.set_working_directory``): the checkout on each worker's machine."""

    def __init__(self, directory: str):
        self.directory = directory

    def set_base_path(self, path: Path) -> None:  # the code is not copied anywhere
        pass

    @property
    def pull_interval(self) -> int | None:
        return None

    @property
    def destination(self) -> Path:
        return Path(self.directory)

    async def pull_code(self) -> None:
        pass

    def to_pull_step(self) -> dict[str, Any]:
        return {"prefect.deployments.steps.set_working_directory": {"directory": self.directory}}

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, WorkingDirectory) and other.directory == self.directory


def ensure_work_pool(client: Any) -> bool:
    """Create the process work pool if it is missing; True if created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(POOL)
        return False
    except ObjectNotFound:
        pass
    try:
        client.create_work_pool(
            WorkPoolCreate(
                name=POOL,
                type="process",
                description="The runbooks of prefect.yaml (runbooks deploy)",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            )
        )
    except ObjectAlreadyExists:  # another `runbooks deploy` made it meanwhile
        return False
    return True


def zombie_automation(heartbeat_seconds: int) -> Any:
    """Prefect's "detect zombie flows" automation: no heartbeat for 3 intervals -> CRASHED."""
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="A flow run whose heartbeats stopped (its process or machine died) is "
        "marked Crashed; installed by `runbooks deploy`.",
        enabled=True,
        tags=["runbooks:deploy"],
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect=set(_HEARTBEAT_OR_END),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=3 * heartbeat_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state="CRASHED",
                message=f"No heartbeat for {3 * heartbeat_seconds} s: its worker or machine "
                "is gone (runbooks deploy's zombie-run automation)",
            )
        ],
    )


def ensure_zombie_automation(client: Any, heartbeat_seconds: int) -> None:
    """One automation of that name, with this definition (idempotent)."""
    wanted = zombie_automation(heartbeat_seconds)
    existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    if existing:
        first, *rest = existing
        client.update_automation(first.id, wanted)
        for extra in rest:
            client.delete_automation(extra.id)
    else:
        client.create_automation(wanted)


def deploy(
    api_url: str, directory: str, heartbeat_seconds: int, automation: bool = True
) -> dict[str, str]:
    """Everything `runbooks deploy` does; returns deployment ids by name."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.catalog import deployment_options, load_catalog, load_flow
    from serving import triggers
    from serving.cli import register_block_types

    specs = load_catalog()
    ids: dict[str, str] = {}
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            if ensure_work_pool(client):
                print(f"created work pool {POOL!r} (process)")
            if automation:
                ensure_zombie_automation(client, heartbeat_seconds)
        print("registered block types:", ", ".join(register_block_types()))
        # triggers updated in place by name, never deleted and recreated (serving/triggers.py)
        triggers.install()
        for spec in specs:
            deployment = load_flow(spec).to_deployment(
                **deployment_options(spec),
                work_pool_name=POOL,
                job_variables={"working_dir": directory},
            )
            deployment.entrypoint = spec.entrypoint
            deployment.storage = WorkingDirectory(directory)
            ids[spec.name] = str(deployment.apply())
            print(f"  deployed {spec.name} -> pool {POOL}")
    return ids


def deploy_main(args: argparse.Namespace) -> int:
    api_url = _api_url(args)
    # the path as the workers' machines see it: not resolved here, where it may not exist
    if not Path(args.directory).is_absolute():
        raise SystemExit(
            f"--directory must be an absolute path on the workers, got {args.directory!r}"
        )
    directory = args.directory.rstrip("/") or "/"
    ids = deploy(api_url, directory, args.heartbeat_seconds, not args.no_heartbeat_automation)
    print(f"{len(ids)} deployments on {api_url}, work pool {POOL!r}, code in {directory}")
    return 0


def worker_command(args: argparse.Namespace) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        POOL,
        "--type",
        "process",
    ]
    if args.name:
        command += ["--name", args.name]
    for queue in args.work_queue or []:
        command += ["--work-queue", queue]
    return command


def worker_env(api_url: str, heartbeat_seconds: int) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_seconds),
    }


def worker_main(args: argparse.Namespace) -> int:
    if not getattr(args, "stock", False):
        return fast_worker_main(args)
    return stock_worker_main(args)


def fast_worker_main(args: argparse.Namespace) -> int:
    """Our worker type in this process (it runs the approval-timeout watcher itself)."""
    from prefect import get_client
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    from serving.fast_worker import run_worker

    api_url = _api_url(args)
    # the runs' environment is this process's (as a stock worker's runs get its environment)
    os.environ.update(worker_env(api_url, args.heartbeat_seconds))
    updates = {PREFECT_API_URL: api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: args.heartbeat_seconds}
    with temporary_settings(updates=updates):
        # a pool the worker had to create itself would be of its own type: make the `process`
        # pool `runbooks deploy` makes (stock workers serve it too)
        with get_client(sync_client=True) as client:
            if ensure_work_pool(client):
                print(f"created work pool {POOL!r} (process)")
        run_worker(POOL, name=args.name, work_queues=args.work_queue)
    return 0


def stock_worker_main(args: argparse.Namespace) -> int:
    """The stock process worker as a child, and beside it the approval-timeout watcher: a run
    suspended for approval has no process to notice its deadline (serving/approval_timeouts.py,
    which `runbooks up` runs in its runner); with workers, every `runbooks worker` runs it. Two
    watchers resuming the same run is harmless: the server accepts only the first resume."""
    import asyncio
    import signal
    import subprocess

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from serving.approval_timeouts import watch_approval_timeouts
    from serving.lifetime import die_with_parent

    api_url = _api_url(args)
    child = subprocess.Popen(
        worker_command(args),
        env=worker_env(api_url, args.heartbeat_seconds),
        preexec_fn=die_with_parent,
    )

    def forward(signum: int, frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    async def watch_while_the_worker_runs() -> None:
        watcher = asyncio.create_task(watch_approval_timeouts(), name="approval-timeouts")
        while child.poll() is None:
            await asyncio.sleep(0.5)
        watcher.cancel()

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        asyncio.run(watch_while_the_worker_runs())
    return child.returncode
