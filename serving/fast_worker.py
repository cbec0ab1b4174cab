"""Our Prefect worker type, `runbooks-process`: a process worker with the fast path of `runbooks up`.

`runbooks worker` starts it (`--stock` starts Prefect's own `prefect worker start --type process`
instead); Prefect also finds it the way it finds every worker type: the package's
`prefect.collections` entry point (pyproject.toml) imports this module, which registers the class
by its `type`, so `prefect worker start --pool runbooks --type runbooks-process` runs it too.

What it changes, compared with Prefect's `ProcessWorker` (which it subclasses: same job template,
same job variables, same state handling, logs, crash reports and cancellation):

1. Pickup on the event. Besides the worker's poll (kept as the fallback: a run whose event is lost
   is started by the next poll), it follows Prefect's events websocket and submits a run of its
   work pool (and of its work queues, when it has some) the moment Prefect emits
   `prefect.flow-run.Scheduled` for it (serving.pickup.EventPickup, shared with `runbooks up`'s
   runner), through the worker's own submission path (its limiter, its set of runs being
   submitted, the PENDING proposal). Runs of a paused pool or queue, or of a pool or queue with a
   concurrency limit, are left to the poll: Prefect enforces those limits only in the poll's query.
   Nothing starts twice: within the process, each SCHEDULED state is submitted at most once,
   whoever finds it (serving.pickup.SubmittedStates); between workers, Prefect's server accepts
   only the first PENDING transition of a SCHEDULED run (its `PreventPendingTransitions` rule).
2. Warm interpreters. The stock worker starts each run as `python -m
   prefect.runner._workspace_supervisor` (an interpreter that imports prefect, runs the
   deployment's pull steps, then execs `python -m prefect.engine`: a second interpreter that
   imports prefect and the flow again), about 3.4 s here before the first task. Ours forks that
   same supervisor step from a fork server that already imported prefect, the engine and every
   flow module of the catalog (serving.warm_start): the child runs Prefect's own
   `supervise()` (pull steps, working directory, environment, the manifest crash hooks read) and
   then, instead of exec'ing `python -m prefect.engine` with the same interpreter, runs that module
   in place. A run whose workspace selects another command (a `uv run` project, an explicit
   command in the job template) is started exactly as the stock worker starts it.
   Each run is a separate process as before; the fork server dies with the worker's main thread
   and every run with the fork server (serving.lifetime), so a SIGKILL of the worker's process
   group (or of the worker alone) leaves no run behind: the zombie-run automation of `runbooks
   deploy` marks such a run CRASHED, as for a stock worker's machine that died.

3. Fewer reads per run. The stock worker reads a run's deployment twice and its flow once while
   it submits the run (the existence check, then the job configuration), and the supervisor
   step reads the run and the deployment again in the new process. Ours keeps what it read for
   a few seconds (`READ_REUSE_S`; a deployment changed in between is used as it was when the
   submission began, as the stock worker does between its two reads; each caller gets its own
   copy, since resolving a job updates the deployment's `env` in place) and hands the run and the
   deployment to the forked child, whose supervisor step prepares the workspace from them (same
   pull steps, same events) instead of reading them again: four API round trips fewer per run.

Work pool type. The `runbooks` pool stays a `process` pool: stock process workers keep serving it
(`runbooks worker --stock`, `prefect worker start --pool runbooks --type process`), side by side
with ours, and `runbooks deploy` is unchanged. A pool of type `runbooks-process` would need this
package installed wherever a pool is created or a stock worker starts, and the server and UI look
up unknown types in Prefect's online collection registry; a `process` pool served by a worker of
ours is the nearest thing Prefect supports for "same job template, faster worker". The worker
accepts `process` pools without Prefect's "worker type mismatch" warning.

Pinned to prefect 3.8.8's worker and runner internals (`BaseWorker._submit_scheduled_flow_runs`,
`ProcessWorker.run`, `prefect.runner._workspace_supervisor` and its
`prepare_workspace_for_flow_run`, `prefect.runner._workspace_resolver.prepare_workspace`);
tests/integration/test_fast_worker.py fails if they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import runpy
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
from prefect.runner._flow_run_executor import FlowRunExecutionResult, FlowRunExecutorContext
from prefect.runner._process_manager import ProcessHandle
from prefect.runner._workspace_runtime import WorkspaceSupervisorConfig, write_private_model
from prefect.runner._workspace_starter import WorkspaceResolvingEngineCommandStarter
from prefect.settings import get_current_settings
from prefect.utilities.processutils import get_sys_executable, sanitize_subprocess_env
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from serving.api_restarts import tolerate_api_restarts
from serving.pickup import EventPickup, SubmittedStates, due

if TYPE_CHECKING:
    import multiprocessing.context

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse, WorkerFlowRunResponse

logger = logging.getLogger("serving.fast_worker")

TYPE = "runbooks-process"
# how long a deployment or flow the worker read is reused (one submission's reads, see the doc)
READ_REUSE_S = 5.0
# imported by the fork server besides serving.warm_start.ENGINE_MODULES: the supervisor step
# and the engine's entry module, which each run executes
WORKER_MODULES = (
    "prefect.engine",
    "prefect.deployments.steps",
    "prefect.runner._workspace_supervisor",
    "prefect.runner._workspace_resolver",
    "serving.fast_worker",
)


def flow_modules() -> list[str]:
    """Every flow module of the catalog (empty outside a checkout of this project)."""
    try:
        from deployments.catalog import flow_module, load_catalog

        return sorted({flow_module(spec) for spec in load_catalog()})
    except (ImportError, FileNotFoundError) as exc:
        logger.warning("no flow modules to preload (%r): each run imports its flow", exc)
        return []


class RunbooksProcessWorker(ProcessWorker):
    """`ProcessWorker` that starts runs on their Scheduled event, in warm forked interpreters.

    `event_pickup=False` keeps only the poll; `warm=False` starts runs as the stock worker does.
    """

    type = TYPE
    _description = (
        "Process worker of the runbooks project: starts runs on their Scheduled event and forks "
        "them from a warm interpreter (serves `process` work pools)."
    )
    _display_name = "Runbooks process"

    def __init__(self, *args: Any, event_pickup: bool = True, warm: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._event_pickup = event_pickup
        self._warm = warm
        self._mp: multiprocessing.context.BaseContext | None = None
        self._submitted_states = SubmittedStates()
        self.pickup: EventPickup | None = None
        self._side_tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> RunbooksProcessWorker:
        if self._warm and self._mp is None:
            from serving import warm_start

            # from the event loop's thread, which is the main thread under `runbooks worker` and
            # `prefect worker start`: the fork server's parent-death signal is tied to it
            self._mp = warm_start.enable([*WORKER_MODULES, *flow_modules()])
        await super().__aenter__()
        _reuse_reads(self.client)
        from serving.approval_timeouts import watch_approval_timeouts

        if self._event_pickup:
            self.pickup = EventPickup(_WorkerTarget(self))
            self._side_tasks.append(asyncio.create_task(self._follow_events(), name="pickup"))
        # suspended approval steps have no process to notice their deadline (as in `runbooks up`)
        self._side_tasks.append(
            asyncio.create_task(watch_approval_timeouts(), name="approval-timeouts")
        )
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        for task in self._side_tasks:
            task.cancel()
        for task in self._side_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._side_tasks.clear()
        if self.pickup is not None:
            await self.pickup.aclose()
        await super().__aexit__(*exc_info)

    async def _follow_events(self) -> None:
        # the pool's id (the events' related resource) is known once the worker has synced
        while self._work_pool is None or not self._has_successfully_synced:
            await asyncio.sleep(0.1)
        pickup = self.pickup
        assert pickup is not None

        async def announce() -> None:
            await pickup.connected.wait()
            self._logger.info("following the events of work pool %r", self._work_pool_name)

        announcing = asyncio.create_task(announce())
        try:
            await pickup.run()
        finally:
            announcing.cancel()

    def _record_work_pool_snapshot(self, work_pool: WorkPool) -> None:
        # BaseWorker's, except that a `process` pool is ours too: no "worker type mismatch"
        # warning for it (BaseWorker has no hook for the accepted types)
        work_pool = copy.deepcopy(work_pool)
        if not work_pool.base_job_template:
            work_pool.base_job_template = self.__class__.get_default_base_job_template()
        known = getattr(self._work_pool, "type", None)
        if known != work_pool.type and work_pool.type not in (self.type, ProcessWorker.type):
            self._logger.warning(
                "Worker type mismatch! This worker serves %r and %r pools but received %r "
                "from the server. Unexpected behavior may occur.",
                self.type,
                ProcessWorker.type,
                work_pool.type,
            )
        self._work_pool = work_pool

    async def _submit_scheduled_flow_runs(
        self, flow_run_response: list[WorkerFlowRunResponse]
    ) -> list[FlowRun]:
        """Both paths (poll, event) end here: each SCHEDULED state is submitted at most once."""
        fresh = [r for r in flow_run_response if self._submitted_states.fresh(r.flow_run)]
        submitted = await super()._submit_scheduled_flow_runs(flow_run_response=fresh)
        # no await since the filter returned: nothing else ran in between on this event loop
        for flow_run in submitted:
            self._submitted_states.remember(flow_run)
        return submitted

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        """`ProcessWorker.run`, with the workspace supervisor forked warm (see the module doc)."""
        if self._mp is None or configuration._command_configured:
            return await super().run(flow_run, configuration, task_status)
        if task_status is None:
            task_status = anyio.TASK_STATUS_IGNORED
        working_dir_ctx = (
            tempfile.TemporaryDirectory(suffix="prefect")
            if not configuration.working_dir
            else contextlib.nullcontext(configuration.working_dir)
        )
        with working_dir_ctx as working_dir, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            async with FlowRunExecutorContext() as ctx:
                workspace_root = Path(working_dir).resolve()
                deployment = (
                    await self.client.read_deployment(flow_run.deployment_id)
                    if flow_run.deployment_id
                    else None
                )
                starter = WarmWorkspaceStarter(
                    self._mp,
                    read=(flow_run, deployment) if deployment is not None else None,
                    workspace_root=workspace_root,
                    stream_output=configuration.stream_output,
                    control_channel=ctx.control_channel,
                    source_cwd=workspace_root,
                    environment=configuration.env,
                )
                ctx.call_after_exit(starter.close)
                executor = ctx.create_executor(
                    flow_run,
                    starter,
                    propose_submitting=False,
                    hook_runner=starter.hook_runner,
                )
                execution: FlowRunExecutionResult | None = None

                async def execute(
                    *, task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED
                ) -> None:
                    nonlocal execution
                    execution = await executor.submit(task_status=task_status)

                async with anyio.create_task_group() as task_group:
                    handle = await task_group.start(execute)
                    if handle.pid is None:
                        raise RuntimeError("Flow run process has no PID")
                    task_status.started(handle.pid)

        if execution is None or execution.status_code is None:
            raise RuntimeError("Failed to start flow run process.")
        return ProcessWorkerResult(
            status_code=execution.status_code, identifier=str(execution.handle.pid)
        )


class _WorkerTarget:
    """The worker's work pool (and queues) for serving.pickup.EventPickup."""

    def __init__(self, worker: RunbooksProcessWorker):
        self._worker = worker

    def related_ids(self) -> list[str]:
        pool = self._worker._work_pool
        assert pool is not None  # _follow_events waits for it
        return [f"prefect.work-pool.{pool.id}"]

    def client(self) -> PrefectClient:
        return self._worker.client

    def taken(self, flow_run_id: UUID) -> bool:
        return flow_run_id in self._worker._submitting_flow_run_ids

    async def poll(self) -> None:
        await self._worker.get_and_submit_flow_runs()

    async def submit(self, flow_run: FlowRun) -> bool:
        from prefect.client.schemas.responses import WorkerFlowRunResponse

        worker = self._worker
        pool = worker._work_pool
        queues = worker._work_queues
        if (
            pool is None
            or worker._runs_task_group is None
            or not worker._has_successfully_synced
            or flow_run.work_pool_id != pool.id
            or (queues and flow_run.work_queue_name not in queues)
            or flow_run.work_queue_id is None
            or pool.is_paused
            or pool.concurrency_limit is not None
            or not due(flow_run, worker._prefetch_seconds)
            or self.taken(flow_run.id)
        ):
            return False  # not ours, not due, already taken, or the poll's to decide
        queue = await worker.client.read_work_queue(flow_run.work_queue_id)
        if queue.is_paused or queue.concurrency_limit is not None or self.taken(flow_run.id):
            return False
        submitted = await worker._submit_scheduled_flow_runs(
            [
                WorkerFlowRunResponse(
                    work_pool_id=pool.id, work_queue_id=flow_run.work_queue_id, flow_run=flow_run
                )
            ]
        )
        if submitted:
            worker._logger.info("flow run %s picked up on its Scheduled event", flow_run.id)
        return bool(submitted)


class WarmWorkspaceStarter(WorkspaceResolvingEngineCommandStarter):
    """The stock worker's starter (same workspace config, manifest and crash-hook runner), whose
    `start` forks the supervisor step from the warm fork server instead of a new interpreter."""

    def __init__(
        self,
        mp: multiprocessing.context.BaseContext,
        read: tuple[FlowRun, DeploymentResponse] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self._mp = mp
        self._read = read  # the run and its deployment as the worker read them

    async def start(
        self,
        flow_run: FlowRun,
        task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        write_private_model(
            self._config_path,
            WorkspaceSupervisorConfig(
                flow_run_id=flow_run.id,
                workspace_root=self._workspace_root,
                manifest_path=self._manifest_path,
                command=self._command,
            ),
        )
        control_registered = False
        control_env: dict[str, str] = {}
        if self._control_channel is not None:
            try:
                port, token = self._control_channel.register(flow_run.id)
                control_env = {"PREFECT__CONTROL_PORT": str(port), "PREFECT__CONTROL_TOKEN": token}
                control_registered = True
            except RuntimeError:  # no loopback listener: kill-only cancellation, as Prefect does
                pass
        # the environment EngineCommandStarter gives the supervisor (env_overrides_settings=True)
        env: dict[str, str | None] = {
            **os.environ,
            **get_current_settings().to_environment_variables(exclude_unset=True),
            **self._environment,
            "PREFECT__FLOW_RUN_ID": str(flow_run.id),
            "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
            **control_env,
            "PREFECT__DEPLOYMENT_NAME": self._deployment_name
            if self._deployment_name is not None
            else self._environment.get("PREFECT__DEPLOYMENT_NAME"),
        }
        if self._heartbeat_seconds is not None:
            env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(int(self._heartbeat_seconds))
        process = self._mp.Process(  # type: ignore[attr-defined]
            target=supervise_warm,
            args=(str(self._config_path), sanitize_subprocess_env(env), self._read),
            name=f"flow-run-{flow_run.id}",
        )
        handed_off = False
        try:
            process.start()
            task_status.started(ProcessHandle(process))
            handed_off = True
            await anyio.to_thread.run_sync(process.join)
        except BaseException:
            if control_registered and not handed_off:
                self._control_channel.unregister(flow_run.id)
            raise


def supervise_warm(
    config_path: str,
    env: dict[str, str],
    read: tuple[FlowRun, DeploymentResponse] | None = None,
) -> None:
    """In the forked child: Prefect's workspace supervisor, then the engine in this process.
    ``read``: the run and its deployment as the worker read them, for the workspace step."""
    import prefect.runner._workspace_supervisor as supervisor
    from prefect.client.orchestration import get_client
    from prefect.context import SettingsContext, get_settings_context
    from prefect.runner._workspace_resolver import prepare_workspace
    from prefect.runner._workspace_runtime import read_model
    from prefect.settings import Settings

    tolerate_api_restarts()  # this run's process only: its API may be restarting right now
    _replace_environment(env)
    read_again = supervisor.prepare_workspace_for_flow_run

    async def prepare(flow_run_id: UUID | str, workspace_root: Path | str) -> Any:
        if read is None or str(read[0].id) != str(flow_run_id):
            return await read_again(flow_run_id, workspace_root)
        flow_run, deployment = read
        async with get_client() as client:  # only for storage blocks: no request by itself
            return await prepare_workspace(client, flow_run, deployment, workspace_root)

    supervisor.prepare_workspace_for_flow_run = prepare  # this child's copy of the module only
    engine: list[tuple[Path, dict[str, str]]] = []
    plain_engine = [get_sys_executable(), "-m", "prefect.engine"]
    exec_engine = supervisor._launch_engine

    async def launch(command: list[str], *, cwd: Path, environment: dict[str, str]) -> int:
        if command != plain_engine:  # `uv run`, an explicit command: exec it, as Prefect does
            return await exec_engine(command, cwd=cwd, environment=environment)
        engine.append((cwd, environment))  # run below, outside this event loop
        return 0

    supervisor._launch_engine = launch  # this child's copy of the module only
    profile = get_settings_context().profile
    with SettingsContext(profile=profile, settings=Settings()):
        config = read_model(Path(config_path), WorkspaceSupervisorConfig)
        code = anyio.run(supervisor.supervise, config)
    if code or not engine:
        sys.exit(code)
    ((cwd, environment),) = engine
    # what `exec python -m prefect.engine` in `cwd` with `environment` would be, minus the exec
    os.chdir(cwd)
    _replace_environment(environment)
    entries = [str(cwd), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    sys.path[:0] = [e for e in entries if e not in sys.path]
    sys.argv = [sys.argv[0]]  # the engine reads the run's id from argv[1], else from the env
    with SettingsContext(profile=profile, settings=Settings()), warnings.catch_warnings():
        # runpy's note that the fork server already imported prefect.engine (which is the point)
        warnings.filterwarnings("ignore", "'prefect.engine' found in sys.modules", RuntimeWarning)
        runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


def _reuse_reads(client: PrefectClient) -> None:
    """Make the worker's client reuse a deployment or flow it read within READ_REUSE_S."""
    import time

    def reusing(read: Any) -> Any:
        kept: dict[UUID, tuple[float, Any]] = {}

        async def read_or_reuse(object_id: UUID) -> Any:
            now = time.monotonic()
            hit = kept.get(object_id)
            if hit is None or now - hit[0] > READ_REUSE_S:
                for key in [k for k, (t, _) in kept.items() if now - t > READ_REUSE_S]:
                    del kept[key]
                hit = kept[object_id] = (now, await read(object_id))
            return hit[1].model_copy(deep=True)  # resolving a job updates its env in place

        return read_or_reuse

    # instance attributes: this client only (the worker's), not PrefectClient
    client.read_deployment = reusing(client.read_deployment)  # type: ignore[method-assign]
    client.read_flow = reusing(client.read_flow)  # type: ignore[method-assign]


def _replace_environment(env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)


def run_worker(
    work_pool: str,
    *,
    name: str | None = None,
    work_queues: list[str] | None = None,
    event_pickup: bool = True,
    warm: bool = True,
) -> None:
    """Run the worker until SIGTERM/SIGINT (what `runbooks worker` does), in the main thread."""
    import signal

    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        worker = RunbooksProcessWorker(
            name=name,
            work_pool_name=work_pool,
            work_queues=work_queues,
            heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
            event_pickup=event_pickup,
            warm=warm,
        )
        with contextlib.suppress(asyncio.CancelledError):
            await worker.start()

    asyncio.run(main())
