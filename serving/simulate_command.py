"""`runbooks simulate` and `runbooks fire`: try an alert before it fires, or fire a test alert.

    runbooks simulate alert.json                 # an Alertmanager or Grafana webhook body
    runbooks simulate --labels alertname=RedisMemoryHigh redis=sessions-cache
    runbooks simulate --labels alertname=KafkaBrokerDown --plan   # + a dry run of each match
    runbooks fire --labels alertname=KafkaBrokerDown kafka_cluster=prod-kafka

`simulate` prints which deployments' triggers would match (evaluated by Prefect's own trigger code,
deployments.simulate), the parameters each run would get and whether they validate; nothing is
emitted to the real triggers. With `--plan` each match also runs, here, in dry-run against the live
systems (blocks read from PREFECT_API_URL), and its report is printed. `fire` posts a real alert to
a running gateway (`make up`), with its token, so the real trigger starts the real run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

HELP = "try an alert: which runbooks it would start, with which parameters (no event sent)"
FIRE_HELP = "send a test alert to a running alert gateway (`make up`)"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def add_arguments(simulate: argparse.ArgumentParser, fire: argparse.ArgumentParser) -> None:
    for parser in (simulate, fire):
        parser.add_argument(
            "payload", nargs="?", help="file with an Alertmanager or Grafana webhook body"
        )
        parser.add_argument(
            "--labels", nargs="+", metavar="NAME=VALUE", help="one alert with these labels"
        )
        parser.add_argument(
            "--resolved", action="store_true", help="the alert is resolved, not firing"
        )
    simulate.add_argument("--plan", action="store_true", help="also dry-run each matching runbook")
    fire.add_argument("--gateway", default="http://127.0.0.1:8700", help="the gateway's base URL")
    fire.add_argument(
        "--token-file",
        default=str(PROJECT_ROOT / ".runbooks" / "gateway-token"),
        help="bearer token file (default: the one `runbooks up` made); RUNBOOKS_GATEWAY_TOKEN wins",
    )


def payload_from(args: argparse.Namespace) -> dict[str, Any]:
    from deployments.simulate import labels_payload

    if bool(args.payload) == bool(args.labels):
        raise SystemExit("give a payload file or --labels (one of them)")
    if args.labels:
        labels = {}
        for item in args.labels:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise SystemExit(f"--labels takes NAME=VALUE, got {item!r}")
            labels[name] = value
        if "alertname" not in labels:
            raise SystemExit("--labels needs alertname=...")
        return labels_payload(labels, "resolved" if args.resolved else "firing")
    try:
        return json.loads(Path(args.payload).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"cannot read {args.payload}: {exc}") from None


def simulate_main(args: argparse.Namespace) -> int:
    from deployments.catalog import load_catalog, load_flow
    from deployments.simulate import alert_events, describe, simulate

    try:
        events = alert_events(payload_from(args))
    except ValueError as exc:
        print(f"the gateway would refuse this payload: {exc}", file=sys.stderr)
        return 2
    specs = {s.name: s for s in load_catalog()}
    status = 0
    for event in events:
        print(f"# {event['event']} {event['resource'].get('prefect.resource.name')}")
        matches = simulate(event, list(specs.values()))
        print(describe(matches))
        for match in matches:
            flow = load_flow(specs[match.deployment])
            model = typing.get_type_hints(flow.fn)["params"]
            try:
                params = model.model_validate(match.parameters.get("params", {}))
            except ValueError as exc:
                print(f"{match.deployment}: the run would FAIL on its parameters:\n{exc}")
                status = 1
                continue
            print(f"{match.deployment}: parameters valid")
            if args.plan:
                params.dry_run = True
                state = flow(params=params, return_state=True)
                print(f"{match.deployment}: dry run {state.type.value}: {state.message or ''}")
                result = state.result(raise_on_failure=False)
                report = getattr(result, "report", None) or getattr(result, "report_markdown", None)
                if isinstance(report, str):
                    print(report)
    return status


def fire_main(args: argparse.Namespace) -> int:
    import httpx

    payload = payload_from(args)
    token = os.environ.get("RUNBOOKS_GATEWAY_TOKEN")
    if not token:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError:
            print(f"no RUNBOOKS_GATEWAY_TOKEN and no token file {args.token_file}", file=sys.stderr)
            return 2
    source = "grafana" if "orgId" in payload else "alertmanager"
    try:
        response = httpx.post(
            f"{args.gateway.rstrip('/')}/alerts/{source}",
            json=payload,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        print(
            f"the gateway at {args.gateway} did not answer: {type(exc).__name__}", file=sys.stderr
        )
        return 2
    print(f"HTTP {response.status_code}: {response.text}")
    return 0 if response.status_code == 202 else 1
