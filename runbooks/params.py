"""Parameter models shared by every runbook flow (they render as the UI's run form)."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar
from uuid import UUID

from prefect.types.names import LOWERCASE_LETTERS_NUMBERS_AND_DASHES_ONLY_REGEX
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

# Prefect sets no length limit on block names; a name is typed by a person, and a longer label
# value is not one: refused before it reaches an API path (255, like Prefect's variable names).
MAX_BLOCK_NAME_LENGTH = 255


def block_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a saved block's name, or None when it can.

    Prefect's rule for block document names (``prefect.types.names.BlockDocumentName``), applied
    to the whole string: Prefect checks it with ``re.match``, whose ``$`` lets a trailing newline
    through.
    """
    if len(name) > MAX_BLOCK_NAME_LENGTH:
        return f"longer than {MAX_BLOCK_NAME_LENGTH} characters"
    if not name or not re.fullmatch(LOWERCASE_LETTERS_NUMBERS_AND_DASHES_ONLY_REGEX, name):
        return "a block name is one or more lowercase letters, numbers and dashes"
    return None


def _literal_block_name(name: str, info: ValidationInfo) -> str:
    """Refuse a name that is not a block name, naming the alert label it came from."""
    problem = block_name_problem(name)
    if problem is None:
        return name
    raise ValueError(
        f"{info.field_name or 'block'} {_shown(name, info)} is not a block name: {problem}; "
        "no block was loaded"
    )


def _shown(value: str, info: ValidationInfo) -> str:
    """The value, cut when long, and the alert label it came from, for an error message."""
    # `alert` is validated before any runbook field (RunbookParams declares it first)
    alert = (info.data or {}).get("alert")
    labels = sorted(k for k, v in alert.labels.items() if v == value) if alert else []
    source = f" (from alert label {', '.join(labels)})" if labels else ""
    shown = repr(value) if len(value) <= 80 else f"{value[:60]!r}... ({len(value)} characters)"
    return shown + source


BlockName = Annotated[str, AfterValidator(_literal_block_name)]
"""The name of a saved block, taken literally: every ``*_block`` parameter has this type.

Alert labels become block names (prefect.yaml's triggers), and ``Block.load`` puts the name
unquoted into an API path, where ``a/../b`` is another block. The check is a validator, not a
``pattern`` in the field's JSON schema, on purpose: Prefect's server validates a deployment
run's parameters against that schema and would refuse to create the run, leaving only a failed
automation action in the event feed; this way the run exists and fails with the reason before
the flow starts (Prefect's "Validation of flow parameters failed").
"""

OptionalBlockName = Annotated[BlockName | None, BeforeValidator(lambda v: None if v == "" else v)]
"""A block name or nothing; an empty form field counts as nothing."""


# Kafka's own rule for topic names (kafka.common.internals.Topic), and for want of one the rule
# for consumer group ids from labels: legal characters, at most 249, not "." or ".."
_KAFKA_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def kafka_name_problem(name: str, what: str = "topic name") -> str | None:
    """Why ``name`` is not a legal Kafka topic name (or group id); None when it is."""
    if name in (".", ".."):
        return f"{name!r} is not a Kafka {what} ('.' and '..' are reserved)"
    if not _KAFKA_NAME.fullmatch(name):
        return f"{name[:80]!r} is not a Kafka {what} (1-249 letters, digits, '.', '_', '-')"
    return None


def _kafka_name(what: str) -> Any:
    def check(value: str | None) -> str | None:
        # a name from an alert label is data: refused unless it is a plain Kafka name. A
        # validator, not a schema pattern, for the reason given under BlockName
        problem = None if value is None else kafka_name_problem(value, what)
        if problem:
            raise ValueError(problem)
        return value

    return AfterValidator(check)


TopicName = Annotated[str, _kafka_name("topic name")]
OptionalTopicName = Annotated[
    str | None,
    BeforeValidator(lambda v: None if v in ("", "None") else v),
    _kafka_name("topic name"),
]
"""A topic name or nothing; an empty form field or an absent alert label ("None") is nothing."""
GroupId = Annotated[str, _kafka_name("consumer group id")]
OptionalGroupId = Annotated[
    str | None,
    BeforeValidator(lambda v: None if v in ("", "None") else v),
    _kafka_name("consumer group id"),
]
"""A consumer group id or nothing (every group). An empty form field, or a trigger's template
rendering a label the alert does not have ("None"), counts as nothing."""


# Where a service runs (tasks/workloads.py): "<platform>/<block name>"
PLATFORM_KINDS = ("kubernetes", "docker", "supervisord")


def platform_ref_problem(value: str) -> str | None:
    """Why ``value`` is not ``kubernetes/NAME``, ``docker/NAME`` or ``supervisord/NAME``."""
    platform, slash, name = value.partition("/")
    if not slash or platform not in PLATFORM_KINDS:
        return (
            f"not a platform: write <platform>/<block name>, the platform one of "
            f"{', '.join(PLATFORM_KINDS)}"
        )
    problem = block_name_problem(name)
    return f"not a platform block: {problem}" if problem else None


def _platform_ref(value: str, info: ValidationInfo) -> str:
    problem = platform_ref_problem(value)
    if problem:
        raise ValueError(
            f"{info.field_name or 'platform'} {_shown(value, info)}: {problem}; no block was loaded"
        )
    return value


PlatformRef = Annotated[str, AfterValidator(_platform_ref)]
"""``<platform>/<block name>``: which platform block says where a service runs."""

# A service's name as the platforms spell them: Kubernetes object names (DNS-1123), Compose
# service and container names, supervisord "group:program" names. A name from an alert label is
# data: anything else (a path, a space, a glob) is refused before it reaches an API.
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,252}")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def service_name_problem(name: str) -> str | None:
    if not _SERVICE_NAME.fullmatch(name) or ".." in name:
        return (
            f"{name[:80]!r} is not a service name (a letter or digit, then up to 252 letters, "
            "digits, '_', '.', ':' or '-')"
        )
    return None


def _service_name(value: str | None) -> str | None:
    problem = None if value is None else service_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _namespace(value: str | None) -> str | None:
    if value is not None and not _NAMESPACE.fullmatch(value):
        raise ValueError(f"{value[:80]!r} is not a Kubernetes namespace (DNS-1123 label)")
    return value


_EMPTY_IS_NONE = BeforeValidator(lambda v: None if v in ("", "None") else v)
ServiceName = Annotated[str, AfterValidator(_service_name)]
OptionalServiceName = Annotated[str | None, _EMPTY_IS_NONE, AfterValidator(_service_name)]
OptionalNamespace = Annotated[str | None, _EMPTY_IS_NONE, AfterValidator(_namespace)]
OptionalPlatformRef = Annotated[PlatformRef | None, _EMPTY_IS_NONE]
"""A platform reference that may be left empty (an optional hand-off or last resort)."""


class AlertContext(BaseModel):
    """The alert that started this run; filled in by the deployment trigger from the event."""

    model_config = ConfigDict(extra="ignore")

    alertname: str | None = Field(None, description="Alert name (the `alertname` label).")
    fingerprint: str | None = Field(None, description="Alertmanager fingerprint of the alert.")
    status: str | None = Field(None, description="firing or resolved.")
    severity: str | None = Field(None, description="The alert's `severity` label.")
    labels: dict[str, str] = Field(default_factory=dict, description="All labels of the alert.")
    starts_at: str | None = Field(None, description="When the alert started firing (RFC 3339).")
    event_id: UUID | None = Field(
        None,
        description="The alert's own event id (the gateway's `payload.alertEventId`, else the id "
        "of the event that started the run; runbooks.alert_claims: one run per alert and "
        "automation). Leave empty on a manual run.",
    )
    event_occurred: datetime | None = Field(
        None, description="When the gateway saw the alert (the event's `occurred`)."
    )

    @field_validator("event_id", "event_occurred", mode="before")
    @classmethod
    def _absent_is_none(cls, value: Any) -> Any:
        # a template that had nothing to render renders "None" or ""
        return None if value in ("", "None", "null") else value

    @field_validator("labels", mode="before")
    @classmethod
    def _only_alert_labels(cls, labels: Any) -> Any:
        # the trigger templates the event's whole resource; Prefect's own keys are not labels
        if isinstance(labels, dict):
            return {k: v for k, v in labels.items() if not str(k).startswith("prefect.")}
        return labels


class OnBusyTarget(StrEnum):
    """What a run does when another run holds the lock on its target."""

    WAIT = "wait"
    SKIP = "skip"


class SafetyParams(BaseModel):
    """Guard rails every runbook shares (see runbooks.safety); defaults suit an alert-driven run."""

    # fields whose schema is a reference get no title from pydantic; the run form needs one
    on_busy_target: OnBusyTarget = Field(
        OnBusyTarget.WAIT,
        title="On Busy Target",
        description="Another run is acting on the same target: wait for it (then re-check) or "
        "stop without acting.",
    )
    busy_wait_s: float = Field(
        300.0, gt=0, le=3600, description="How long to wait for a busy target before stopping."
    )
    approval_timeout_s: int = Field(
        900,
        ge=1,
        le=86400,
        description="How long a destructive step waits for approval; no answer rejects and "
        "escalates.",
    )
    approval_poll_s: int = Field(
        5, ge=1, le=60, description="How often a paused run checks whether it was answered."
    )
    escalation_block: OptionalBlockName = Field(
        "default",
        description="Name of the 'Runbooks Escalation Policy' block to notify on failure, spent "
        "budget, rejection or approval timeout; empty: no notification.",
    )
    budget_max_actions: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Override the runbook's remediation budget: at most this many executions of "
        "an action per target per window; empty: the runbook's default.",
    )
    budget_window_s: float | None = Field(
        None, gt=0, le=30 * 86400, description="Override the budget's window, in seconds."
    )
    alert_resolved_verifies: bool = Field(
        True,
        description="When an alert started the run, its alert.resolved event also counts as "
        "verification of the fix.",
    )
    min_approvers: int = Field(
        1,
        ge=1,
        le=5,
        description="Different people who must approve each step that needs approval (2: four "
        "eyes, e.g. for runbooks that can lose data: topic recreation, FLUSHDB); the same "
        "person twice counts once, one rejection ends it.",
    )
    approval_slack_block: OptionalBlockName = Field(
        None,
        description="Name of a Prefect 'Slack Webhook' block: approval requests are also posted "
        "there with Approve / Reject buttons (answered through the alert gateway's "
        "/slack/interactions); empty: the Prefect UI's resume form only.",
    )
    silence_block: OptionalBlockName = Field(
        None,
        description="Name of a 'Runbooks Alertmanager' block: while this run changes the "
        "alert's target, the alert that started it is silenced there (all its labels, nothing "
        "broader), and the silence is expired when the run ends; empty: no silence.",
    )
    silence_max_s: int = Field(
        3600,
        ge=5,
        le=86400,
        description="Longest a silence lasts: a run killed mid-way cannot expire its silence, "
        "which then ends by itself after this long.",
    )


# The run form lists dry_run first: it decides whether the run changes anything, so a person
# starting a run by hand sees it before anything else; the runbook's own fields follow; the
# alert (filled in by triggers) and the shared safety settings, rarely touched by hand, come last.
FORM_FIRST = ("dry_run",)
FORM_LAST = ("alert", "safety")


def form_order(fields: list[str]) -> list[str]:
    """Order of a runbook's parameters in the run form: FORM_FIRST, its own fields, FORM_LAST."""
    first = [f for f in FORM_FIRST if f in fields]
    last = [f for f in FORM_LAST if f in fields]
    return first + [f for f in fields if f not in first and f not in last] + last


def _order_run_form(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Reorder the properties of a params model's JSON schema (the UI's run form) by form_order.

    Pydantic lists a base class's fields before a subclass's. Each property also gets a
    `position`, which the UI sorts by: a PostgreSQL-backed Prefect server keeps the schema in
    JSONB, which does not keep key order.
    """
    properties = schema.get("properties") or {}
    schema["properties"] = {
        name: {**properties[name], "position": index}
        for index, name in enumerate(form_order(list(properties)))
    }


class RunbookParams(BaseModel):
    """Fields every runbook takes. Runbooks subclass this with their own, documented fields."""

    model_config = ConfigDict(json_schema_extra=_order_run_form)

    dry_run: bool = Field(
        False,
        description="Plan only: run every check, report what would be changed, change nothing.",
    )
    # fields whose schema is a reference get no title from pydantic; the run form needs one
    alert: AlertContext | None = Field(
        None,
        title="Alert",
        description="Set by alert triggers; leave empty for manual or scheduled runs.",
    )
    safety: SafetyParams = Field(
        default_factory=SafetyParams,
        title="Safety",
        description="Locks, approvals, escalation and verification settings.",
    )


_Named = TypeVar("_Named")


def unique_names(items: list[_Named]) -> list[_Named]:
    """A list validator (``AfterValidator``): each item's ``name`` at most once, e.g. a topic
    declared twice with two different specs, where one would silently win."""
    names = [item.name for item in items]  # type: ignore[attr-defined]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"listed more than once: {', '.join(twice)}")
    return items
