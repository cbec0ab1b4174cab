"""Run the gateway with uvicorn: ``python -m alert_gateway`` or ``runbooks gateway``."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys

import uvicorn
from pydantic import ValidationError

from alert_gateway.app import create_app
from alert_gateway.auth import GatewayConfigError
from alert_gateway.settings import GatewaySettings

DEFAULT_PORT = 8700


def run(host: str, port: int, settings: GatewaySettings) -> None:
    """Serve the gateway until interrupted.

    Raises `GatewayConfigError` (before listening) when there is no token and not ``insecure``.
    """
    app = create_app(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=5, log_level="info")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's command-line options (shared by ``python -m alert_gateway`` and ``runbooks gateway``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="accept alerts without a bearer token (otherwise RUNBOOKS_GATEWAY_TOKEN is required)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Start from parsed options and ``RUNBOOKS_GATEWAY_*`` variables; 2 on a configuration error."""
    try:
        settings = GatewaySettings(**({"insecure": True} if args.insecure else {}))
        run(args.host, args.port, settings)
    except (GatewayConfigError, ValidationError) as exc:
        print(f"alert gateway not started: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alert_gateway",
        description="Forward Alertmanager and Grafana webhooks to Prefect as events.",
    )
    add_arguments(parser)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: stacks to the log
    return run_from_args(parser.parse_args(argv))
