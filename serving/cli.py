"""The `runbooks` command: run the product (`up`), list runbooks, save blocks, register block types.

`runbooks up` is one process tree: a Prefect server on the embedded SQLite database (unless
`--api-url` points at an existing server), the alert gateway (Alertmanager/Grafana webhooks to
Prefect events), the project's block types registered, and every deployment of prefect.yaml
served with its schedules and triggers. Ctrl-C stops all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serving.lifetime import die_with_parent, stacks_on_sigusr1

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The runner's poll: the fallback for runs whose Scheduled event was missed, and what starts
# scheduled runs (up to Prefect's 10 s prefetch ahead of their time).
POLL_SECONDS = 5.0
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runbooks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Prefect (SQLite), register blocks, serve every runbook")
    up.add_argument("--host", default="127.0.0.1", help="address of the Prefect server/UI")
    up.add_argument("--port", type=int, default=4200, help="port of the Prefect server/UI")
    up.add_argument(
        "--api-url",
        default=None,
        help="use this existing Prefect API (e.g. a team server on PostgreSQL) instead of starting one",
    )
    up.add_argument(
        "--poll-seconds",
        type=float,
        default=POLL_SECONDS,
        help="how often the runner also polls for due runs; alert-triggered runs start on their "
        "Scheduled event (serving/pickup.py), the poll is the fallback and starts scheduled "
        "runs (python -m bench trigger-latency)",
    )
    up.add_argument(
        "--no-event-pickup",
        action="store_true",
        help="start runs only from the poll, not on their Scheduled event",
    )
    up.add_argument("--gateway-port", type=int, default=8700, help="port of the alert gateway")
    up.add_argument("--no-gateway", action="store_true", help="do not start the alert gateway")
    gateway = sub.add_parser("gateway", help="run the alert gateway on its own")
    from alert_gateway.server import add_arguments as add_gateway_arguments

    add_gateway_arguments(gateway)
    sub.add_parser("list", help="list the runbooks declared in prefect.yaml")
    sub.add_parser(
        "register-blocks", help="register the project's block types with the Prefect API"
    )
    from serving import block_command

    sub.add_parser("block", help=block_command.HELP)
    from serving import simulate_command

    simulate_command.add_arguments(
        sub.add_parser("simulate", help=simulate_command.HELP),
        sub.add_parser("fire", help=simulate_command.FIRE_HELP),
    )
    from serving import new_command

    new_command.add_arguments(sub.add_parser("new", help=new_command.HELP))
    from serving import deploy_command

    deploy_command.add_arguments(
        sub.add_parser("deploy", help=deploy_command.HELP),
        sub.add_parser("worker", help=deploy_command.WORKER_HELP),
    )
    # `block` parses its own arguments: its parser imports every block module, built only for it
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["block"]:
        return block_command.main(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "up":
        gateway_port = None if args.no_gateway else args.gateway_port
        return _up(
            args.host,
            args.port,
            args.api_url,
            args.poll_seconds,
            gateway_port,
            event_pickup=not args.no_event_pickup,
        )
    if args.command == "gateway":
        from alert_gateway.server import run_from_args

        return run_from_args(args)
    if args.command == "list":
        _print_runbooks()
        return 0
    if args.command == "simulate":
        return simulate_command.simulate_main(args)
    if args.command == "fire":
        return simulate_command.fire_main(args)
    if args.command == "new":
        return new_command.main(args)
    if args.command == "deploy":
        return deploy_command.deploy_main(args)
    if args.command == "worker":
        return deploy_command.worker_main(args)
    if args.command == "register-blocks":
        names = register_block_types()
        print("registered block types:", ", ".join(names))
        return 0
    return 2


def register_block_types() -> list[str]:
    """Register every Block class of the `blocks` package (idempotent)."""
    from prefect.blocks.core import Block

    import blocks

    names = []
    for name in blocks.__all__:
        cls = getattr(blocks, name)
        if isinstance(cls, type) and issubclass(cls, Block):
            cls.register_type_and_schema()
            names.append(cls.get_block_type_slug())
    return names


def _print_runbooks() -> None:
    from deployments.catalog import load_catalog

    for spec in load_catalog():
        when = []
        if spec.triggers:
            when.append("alert trigger")
        if spec.schedules:
            when.append("schedule")
        print(f"  - {spec.name:32} [{', '.join(spec.tags)}] ({' + '.join(when) or 'manual'})")


def _up(
    host: str,
    port: int,
    api_url: str | None,
    poll_seconds: float,
    gateway_port: int | None,
    event_pickup: bool = True,
) -> int:
    ui_url = f"http://{host}:{port}"
    own_server = api_url is None
    api_url = api_url or f"{ui_url}/api"
    # Must be in the environment before prefect is imported: its settings are read at import.
    os.environ.setdefault("PREFECT_HOME", str(PROJECT_ROOT / ".prefect"))
    os.environ["PREFECT_API_URL"] = api_url
    os.environ.setdefault("PREFECT_UI_URL", ui_url if own_server else api_url.removesuffix("/api"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    def _terminate(signum: int, frame: object) -> None:
        # SIGTERM stops us as Ctrl-C does: while the runner runs, asyncio's SIGINT handler
        # cancels it cleanly; before and after, Python raises KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, _terminate)
    stacks_on_sigusr1()
    children: list[subprocess.Popen] = []
    server: subprocess.Popen | None = None
    try:
        if own_server:
            print(f"starting Prefect server on {ui_url} (SQLite in {os.environ['PREFECT_HOME']})")
            # `prefect server start`, with one SQLite fix for alert-triggered runs (see module)
            server = _start_child(
                [
                    sys.executable,
                    "-m",
                    "serving.sqlite_server",
                    "--host",
                    host,
                    "--port",
                    str(port),
                ],
                # Leases of the runbooks' target locks on disk (PREFECT_HOME/concurrency_leases),
                # not in the server's memory: after a crash and restart the server still knows a
                # dead holder's lease and frees its slot when it expires (runbooks/locks.py).
                env={**os.environ, "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE},
            )
            children.append(server)
        _wait_healthy(api_url, server)
        slugs = register_block_types()
        print("registered block types:", ", ".join(slugs))

        from deployments.catalog import add_to_runner, flow_module, load_catalog
        from serving import triggers, warm_start
        from serving.pickup import EventDrivenRunner

        specs = load_catalog()
        warm_start.enable(sorted({flow_module(spec) for spec in specs}))
        # Schedules stay as declared across restarts: no pausing them on the way out.
        runner = EventDrivenRunner(
            name="runbooks",
            query_seconds=poll_seconds,
            pause_on_shutdown=False,
            event_pickup=event_pickup,
        )
        # Runner.start would put its own SIGTERM handler in place of ours; it calls the sync
        # stop() from inside the event loop, where Prefect hands back astop() un-awaited
        # ("coroutine 'Runner.astop' was never awaited"), and exits mid-loop
        runner.handle_sigterm = _terminate  # type: ignore[method-assign]
        # an automation kept in place keeps matching alerts while we (re)apply the deployments
        triggers.install()
        add_to_runner(runner, specs)
        # Only now the gateway: alerts it accepted while we were down (its spool) reach
        # Prefect once every deployment and its automations exist, and none lands in a restart.
        if gateway_port is not None:
            children.append(_start_gateway(host, gateway_port))
        print(f"\nPrefect UI: {os.environ['PREFECT_UI_URL']}\nrunbooks:")
        _print_runbooks()
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
    return 0


def _start_child(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child in its own session: Ctrl-C reaches only us, so the runner stops before the
    servers it talks to; each child still dies with us (serving.lifetime) if we are killed."""
    return subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=env, start_new_session=True, preexec_fn=die_with_parent
    )


def _start_gateway(host: str, port: int) -> subprocess.Popen:
    """The alert gateway, with the token from RUNBOOKS_GATEWAY_TOKEN or a generated token file."""
    env = dict(os.environ)
    where = "RUNBOOKS_GATEWAY_TOKEN"
    if not env.get("RUNBOOKS_GATEWAY_TOKEN"):
        token_file = PROJECT_ROOT / ".runbooks" / "gateway-token"
        if not token_file.exists():
            token_file.parent.mkdir(parents=True, exist_ok=True)
            token_file.touch(mode=0o600)
            token_file.write_text(secrets.token_urlsafe(32))
        env["RUNBOOKS_GATEWAY_TOKEN"] = token_file.read_text().strip()
        where = str(token_file)
    print(f"alert gateway: http://{host}:{port}/alerts/alertmanager (bearer token: {where})")
    return _start_child(
        [sys.executable, "-m", "alert_gateway", "--host", host, "--port", str(port)], env=env
    )


def _wait_healthy(api_url: str, server: subprocess.Popen | None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"Prefect server exited with code {server.returncode}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"Prefect API at {api_url} not healthy after {timeout_s:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
