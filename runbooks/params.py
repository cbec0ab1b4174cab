"""Parameter models shared by every runbook flow (they render as the UI's run form)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class AlertContext(BaseModel):
    """The alert that started this run; filled in by the deployment trigger from the event."""

    model_config = ConfigDict(extra="ignore")

    alertname: str | None = Field(None, description="Alert name (the `alertname` label).")
    fingerprint: str | None = Field(None, description="Alertmanager fingerprint of the alert.")
    status: str | None = Field(None, description="firing or resolved.")
    severity: str | None = Field(None, description="The alert's `severity` label.")
    labels: dict[str, str] = Field(default_factory=dict, description="All labels of the alert.")
    starts_at: str | None = Field(None, description="When the alert started firing (RFC 3339).")

    @field_validator("labels", mode="before")
    @classmethod
    def _only_alert_labels(cls, labels: Any) -> Any:
        # the trigger templates the event's whole resource; Prefect's own keys are not labels
        if isinstance(labels, dict):
            return {k: v for k, v in labels.items() if not str(k).startswith("prefect.")}
        return labels


class RunbookParams(BaseModel):
    """Fields every runbook takes. Runbooks subclass this with their own, documented fields."""

    dry_run: bool = Field(
        False,
        description="Plan only: run every check, report what would be changed, change nothing.",
    )
    alert: AlertContext | None = Field(
        None, description="Set by alert triggers; leave empty for manual or scheduled runs."
    )
