"""Typed results of mutating tasks: what was planned, what was applied.

Every task that changes something returns a ``ChangeSet`` (or a subclass with extra typed
fields). In dry-run, ``planned`` is filled and ``applied`` stays empty, so the same object
tells the report what *would* happen.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Change(BaseModel):
    """One change to one target."""

    action: str = Field(description="Verb naming the change, e.g. 'terminate_backend'.")
    target: str = Field(description="What the change acts on, e.g. 'orders-db pid=4242'.")
    detail: dict[str, Any] = Field(default_factory=dict, description="Facts about the target.")

    def describe(self) -> str:
        return f"{self.action} {self.target}"


class ChangeSet(BaseModel):
    """What a mutating task changed, or in dry-run would change."""

    dry_run: bool = Field(description="True when nothing was changed on purpose.")
    planned: list[Change] = Field(default_factory=list, description="Changes the task decided on.")
    applied: list[Change] = Field(default_factory=list, description="Changes actually made.")
    notes: list[str] = Field(default_factory=list, description="Why something was skipped, etc.")

    @property
    def changed(self) -> bool:
        return bool(self.applied)

    def summary(self) -> str:
        if not self.planned:
            return "no change needed"
        if self.dry_run:
            return f"dry-run: would apply {len(self.planned)} change(s)"
        return f"applied {len(self.applied)} of {len(self.planned)} planned change(s)"
