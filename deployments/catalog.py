"""Read the runbook deployments declared in `prefect.yaml`.

`prefect.yaml` stays the single source of truth: a team runs `runbooks deploy` (serving/deploy_command.py) against a
work pool; `runbooks up` (one laptop) reads the same entries here and serves them in-process.
"""

from __future__ import annotations

import importlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, RRuleSchedule
from prefect.events import DeploymentTriggerTypes
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"

_triggers = TypeAdapter(list[DeploymentTriggerTypes])


class RunbookSpec(BaseModel):
    """One `deployments:` entry of prefect.yaml (the fields this project uses)."""

    model_config = ConfigDict(extra="allow")

    name: str
    entrypoint: str
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    schedules: list[dict[str, Any]] = Field(default_factory=list)
    triggers: list[dict[str, Any]] = Field(default_factory=list)
    concurrency_limit: int | None = None

    def schedule_objects(self) -> list[DeploymentScheduleCreate]:
        return [_schedule(self.name, i, s) for i, s in enumerate(self.schedules, 1)]

    def trigger_objects(self) -> list[DeploymentTriggerTypes]:
        seen: set[str] = set()
        for index, trigger in enumerate(self.triggers, 1):
            problem = trigger_name_problem(self.name, trigger)
            if problem:
                raise ValueError(f"deployment {self.name}, trigger {index}: {problem}")
            # the name is how a restart finds the automation to keep (serving/triggers.py)
            if trigger["name"] in seen:
                raise ValueError(
                    f"deployment {self.name}, trigger {index}: the name {trigger['name']!r} is "
                    "already used by another trigger of this deployment"
                )
            seen.add(trigger["name"])
        return _triggers.validate_python(self.triggers)


def trigger_name_problem(deployment: str, trigger: dict[str, Any]) -> str | None:
    """Why a trigger's name would not tell a person what starts the runbook; None if it does.

    The name is the automation's name in the UI, and the UI describes every such trigger only
    as "A custom trigger". prefect.yaml names each trigger itself, because `prefect deploy`
    would otherwise call it `<deployment>__automation_1`: "<deployment> on alert A, B".
    """
    alertnames = (trigger.get("match") or {}).get("alertname") or []
    if isinstance(alertnames, str):
        alertnames = [alertnames]
    name = trigger.get("name")
    if not name:
        example = f"{deployment} on alert {', '.join(alertnames)}" if alertnames else deployment
        return f"no name; name it for what it matches, e.g. {example!r}"
    missing = [word for word in (deployment, *alertnames) if word not in name]
    if missing:
        return f"its name {name!r} does not mention {', '.join(missing)}"
    return None


def load_catalog(path: Path = PREFECT_YAML) -> list[RunbookSpec]:
    """Parse and validate every deployment in prefect.yaml (raises on a bad entry)."""
    document = yaml.safe_load(path.read_text())
    specs = [RunbookSpec.model_validate(d) for d in document.get("deployments") or []]
    for spec in specs:
        spec.trigger_objects()
        spec.schedule_objects()
    return specs


def flow_module(spec: RunbookSpec) -> str:
    """The importable module of a spec's flow.

    `flows/kafka/kafka_cluster_down.py:x` -> `flows.kafka.kafka_cluster_down`.
    """
    path = spec.entrypoint.split(":", 1)[0]
    return path.removesuffix(".py").replace("/", ".")


def load_flow(spec: RunbookSpec) -> Any:
    """Import a spec's flow by module name (not file path), so it pickles by reference."""
    return getattr(importlib.import_module(flow_module(spec)), spec.entrypoint.rsplit(":", 1)[1])


def deployment_options(spec: RunbookSpec) -> dict[str, Any]:
    """The deployment settings of a spec, as `Flow.to_deployment` / `Runner.add_flow` take them."""
    return {
        "name": spec.name,
        "description": spec.description,
        "tags": spec.tags,
        "parameters": spec.parameters,
        "schedules": spec.schedule_objects(),
        "triggers": spec.trigger_objects(),
        "concurrency_limit": spec.concurrency_limit,
    }


def to_runner_deployments(specs: list[RunbookSpec]) -> list[Any]:
    """Deployments to apply to a Prefect server (without serving them), e.g. in tests."""
    return [load_flow(spec).to_deployment(**deployment_options(spec)) for spec in specs]


def add_to_runner(runner: Any, specs: list[RunbookSpec]) -> None:
    """Serve every spec from this runner, with its flow object registered.

    `prefect.serve(*deployments)` registers no flow objects, so each run would start a cold
    `python -m prefect.engine`; `Runner.add_flow` keeps the flow, and the runner starts runs
    with `run_flow_in_subprocess`, which `serving.warm_start` makes a fork of a warm process.
    """
    for spec in specs:
        runner.add_flow(load_flow(spec), **deployment_options(spec))


def _schedule(deployment: str, index: int, config: dict[str, Any]) -> DeploymentScheduleCreate:
    """A prefect.yaml schedule entry (cron / interval / rrule) as a deployment schedule."""
    tz = config.get("timezone")
    if "cron" in config:
        schedule: Any = CronSchedule(cron=config["cron"], **({"timezone": tz} if tz else {}))
    elif "interval" in config:
        interval = config["interval"]
        if isinstance(interval, int | float):
            interval = timedelta(seconds=interval)
        schedule = IntervalSchedule(interval=interval, **({"timezone": tz} if tz else {}))
    elif "rrule" in config:
        schedule = RRuleSchedule(rrule=config["rrule"], **({"timezone": tz} if tz else {}))
    else:
        raise ValueError(f"schedule needs cron, interval or rrule: {config}")
    return DeploymentScheduleCreate(
        schedule=schedule,
        active=config.get("active", True),
        parameters=config.get("parameters") or {},
        # a stable slug lets a re-deploy update the schedule instead of adding a twin
        slug=config.get("slug") or f"{deployment}-schedule-{index}",
    )


def runbook_alertnames(path: Path = PREFECT_YAML) -> list[str]:
    """Every alert name a deployment's trigger starts a runbook on, sorted."""
    names: set[str] = set()
    for spec in load_catalog(path):
        for trigger in spec.triggers:
            found = (trigger.get("match") or {}).get("alertname") or []
            names.update([found] if isinstance(found, str) else found)
    return sorted(names)
