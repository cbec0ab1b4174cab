"""Which automations a re-applied deployment creates, updates in place or deletes (serving/triggers.py)."""

from uuid import UUID, uuid4

import pytest
from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import Automation, AutomationCore, EventTrigger

from serving.triggers import MARK, plan_trigger_sync

DEPLOYMENT = UUID(int=7)
OWNER = f"prefect.deployment.{DEPLOYMENT}"


def declared(name: str, alertname: str = "A", enabled: bool = True) -> AutomationCore:
    """As Prefect builds it from prefect.yaml: fresh random trigger id every time."""
    return AutomationCore(
        name=name,
        enabled=enabled,
        trigger=EventTrigger(
            id=uuid4(), expect={"alert.firing"}, match={"alertname": alertname}, posture="Reactive",
            threshold=1,
        ),
        actions=[RunDeployment(source="selected", deployment_id=DEPLOYMENT, parameters={})],
        owner_resource=OWNER,
        tags=[MARK],
    )


def stored(
    name: str, *, id: int, alertname: str = "A", enabled: bool = True, tags: list[str] | None = None
) -> Automation:
    """As the server returns it (the API does not say who owns it)."""
    automation = declared(name, alertname, enabled).model_dump(exclude={"owner_resource"})
    return Automation(id=UUID(int=id), **(automation | {"tags": [MARK] if tags is None else tags}))


CASES = [
    # (existing, declared, created names, updated (id, name), deleted ids)
    ([], [declared("a")], ["a"], [], []),
    ([stored("a", id=1)], [declared("a")], [], [], []),  # unchanged: untouched (no window)
    ([stored("a", id=1)], [declared("a", alertname="B")], [], [(1, "a")], []),
    ([stored("a", id=1)], [declared("a", enabled=False)], [], [(1, "a")], []),
    ([stored("a", id=1), stored("old", id=2)], [declared("a")], [], [], [2]),
    ([stored("a", id=1)], [declared("a"), declared("b")], ["b"], [], []),
    ([stored("a", id=1), stored("a", id=3)], [declared("a")], [], [], [3]),  # a twin from a crash
    ([stored("a", id=1)], [], [], [], [1]),
    # made by stock Prefect before (no tag, a declared name): adopted, updated to carry the tag
    ([stored("a", id=1, tags=[])], [declared("a")], [], [(1, "a")], []),
    # made by a person in the UI to run this deployment: never ours to update or delete
    ([stored("mine", id=4, tags=[])], [declared("a")], ["a"], [], []),
    ([stored("a", id=4, tags=["team"])], [declared("a")], ["a"], [], []),
]


@pytest.mark.parametrize(("existing", "wanted", "created", "updated", "deleted"), CASES)
def test_plan(existing, wanted, created, updated, deleted) -> None:
    create, update, delete = plan_trigger_sync(existing, wanted)
    assert [a.name for a in create] == created
    assert [(i.int, a.name) for i, a in update] == updated
    assert [i.int for i in delete] == deleted
