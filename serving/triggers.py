"""A deployment's alert triggers kept in place across restarts of `runbooks up`.

Prefect 3.8.8 (``RunnerDeployment._create_triggers[_sync]``) deletes every automation a deployment
owns and creates them again each time the deployment is applied, i.e. at every start of the
runner. An alert event that reaches Prefect in between matches no automation and starts no run:
lost, though the gateway had accepted it. That window is open at every restart, exactly when a
gateway that kept accepting alerts (its own process, another host, or the spool `runbooks up`
forwards at start) delivers them (issue #9 defect 6).

Here an automation made from the deployment's prefect.yaml triggers (tagged ``MARK``) is matched by
name (prefect.yaml names every trigger, and tests/unit/test_catalog.py keeps the names unique
within a deployment): left untouched when
nothing changed, updated in place (same id, same automation throughout) when its definition
changed; declared triggers with no automation are created, and automations no longer declared
are deleted. Prefect has no API for this; it is a replacement of those two methods, installed by
`runbooks up` before it applies the deployments. tests/integration/test_restart_backlog.py checks
the ids survive a restart.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

# owner_resource: the server keeps it as a relation and never returns it
_IGNORED = {"id", "created", "updated", "owner_resource"}


def _definition(automation: Any) -> Any:
    """An automation's definition for comparison: JSON, without ids and timestamps at any depth
    (trigger ids are new random UUIDs each time Prefect builds the automation)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _IGNORED}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    from prefect.events.schemas.automations import AutomationCore

    fields = set(AutomationCore.model_fields)
    return strip(automation.model_dump(mode="json", include=fields))


MARK = "runbooks:prefect.yaml"
"""Tag on the automations made from prefect.yaml triggers. The API that lists a deployment's
automations (``/automations/related-to/``) also returns automations people made in the UI to run
it, and does not say which the deployment owns; those are never touched here."""


def _ours(automation: Any, declared_names: set[str]) -> bool:
    # untagged with a declared name: made by stock Prefect before this module existed (adopted)
    return MARK in automation.tags or (not automation.tags and automation.name in declared_names)


def plan_trigger_sync(
    related: list[Any], declared: list[Any]
) -> tuple[list[Any], list[tuple[UUID, Any]], list[UUID]]:
    """What to create, update (id, definition) and delete so the deployment's own automations are
    the declared ones; unchanged automations, and automations that are not ours, appear in none of
    the three. Pure: unit-tested."""
    names = {a.name for a in declared}
    by_name: dict[str, list[Any]] = {}
    for automation in related:
        if _ours(automation, names):
            by_name.setdefault(automation.name, []).append(automation)
    create: list[Any] = []
    update: list[tuple[UUID, Any]] = []
    for automation in declared:
        same_name = by_name.get(automation.name)
        if not same_name:
            create.append(automation)
            continue
        kept = same_name.pop(0)
        if _definition(kept) != _definition(automation):
            update.append((kept.id, automation))
    delete = [a.id for rest in by_name.values() for a in rest]
    return create, update, delete


def _declared(deployment: Any, deployment_id: UUID) -> list[Any]:
    automations = []
    for trigger in deployment.triggers:
        trigger.set_deployment_id(deployment_id)
        automation = trigger.as_automation()
        automation.tags = [*automation.tags, MARK]
        automations.append(automation)
    return automations


def _as_update(automation: Any) -> Any:
    """The automation as the update API takes it: without owner_resource (422 otherwise; the
    ownership relation stays as it was)."""
    return type(automation).model_validate(automation.model_dump(exclude={"owner_resource"}))


def _missing_api(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) == 404


def install() -> None:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.exceptions import PrefectHTTPStatusError

    if getattr(RunnerDeployment._create_triggers_sync, "_runbooks", False):
        return

    def create_triggers_sync(self: Any, deployment_id: UUID, client: Any) -> Any:
        owner = f"prefect.deployment.{deployment_id}"
        try:
            related = client.read_resource_related_automations(owner)
        except PrefectHTTPStatusError as exc:
            if _missing_api(exc):  # a server without automations, as Prefect's own code allows
                return deployment_id
            raise
        create, update, delete = plan_trigger_sync(related, _declared(self, deployment_id))
        for automation_id, automation in update:
            client.update_automation(automation_id, _as_update(automation))
        for automation in create:
            client.create_automation(automation)
        for automation_id in delete:
            client.delete_automation(automation_id)
        return None

    async def create_triggers(self: Any, deployment_id: UUID, client: Any) -> Any:
        owner = f"prefect.deployment.{deployment_id}"
        try:
            related = await client.read_resource_related_automations(owner)
        except PrefectHTTPStatusError as exc:
            if _missing_api(exc):
                return deployment_id
            raise
        create, update, delete = plan_trigger_sync(related, _declared(self, deployment_id))
        for automation_id, automation in update:
            await client.update_automation(automation_id, _as_update(automation))
        for automation in create:
            await client.create_automation(automation)
        for automation_id in delete:
            await client.delete_automation(automation_id)
        return None

    create_triggers_sync._runbooks = True  # type: ignore[attr-defined]
    RunnerDeployment._create_triggers_sync = create_triggers_sync  # type: ignore[method-assign]
    RunnerDeployment._create_triggers = create_triggers  # type: ignore[method-assign]
