"""The device-token table (PostgreSQL): how many tokens are stale, and pruning them in batches.

A token is stale when the provider marked it invalid (``invalid_column`` set, e.g. the dispatcher
stamps it when FCM answers UNREGISTERED or APNs 410) or when it was not seen for
``stale_after_days``. Table and column names reach SQL only as ``psycopg.sql.Identifier``.
"""

from __future__ import annotations

import time

from prefect import task
from psycopg import sql
from pydantic import BaseModel, Field, model_validator

from blocks.postgres import PostgresDatabase
from runbooks.results import Change, ChangeSet
from tasks.postgres import pg_retries


class TokenTable(BaseModel):
    """Where the device tokens are and what makes one stale."""

    schema_name: str = Field("public", min_length=1, max_length=63)
    table: str = Field("device_tokens", min_length=1, max_length=63)
    invalid_column: str | None = Field("invalidated_at", max_length=63)
    last_seen_column: str | None = Field("last_seen_at", max_length=63)
    stale_after_days: float = Field(270, gt=0, le=3650)

    @model_validator(mode="after")
    def _one_criterion(self) -> TokenTable:
        if not self.invalid_column and not self.last_seen_column:
            raise ValueError("name invalid_column, last_seen_column or both")
        return self

    @property
    def name(self) -> str:
        return f"{self.schema_name}.{self.table}"

    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema_name, self.table)

    def invalid(self) -> sql.Composable:
        if not self.invalid_column:
            return sql.SQL("false")
        return sql.SQL("{} IS NOT NULL").format(sql.Identifier(self.invalid_column))

    def not_seen(self) -> sql.Composable:
        if not self.last_seen_column:
            return sql.SQL("false")
        return sql.SQL("{} < now() - make_interval(secs => %(stale_s)s)").format(
            sql.Identifier(self.last_seen_column)
        )

    def stale(self) -> sql.Composable:
        return sql.SQL("({} OR {})").format(self.invalid(), self.not_seen())

    def params(self, **extra: object) -> dict[str, object]:
        return {"stale_s": self.stale_after_days * 86400, **extra}

    def criteria(self) -> str:
        parts = []
        if self.invalid_column:
            parts.append(f"{self.invalid_column} set (marked invalid by the provider)")
        if self.last_seen_column:
            parts.append(f"{self.last_seen_column} older than {self.stale_after_days:g} days")
        return " or ".join(parts)


class TokenSurvey(BaseModel):
    """Counts of the token table."""

    total: int
    invalid: int = Field(description="Marked invalid by the provider.")
    not_seen: int = Field(description="Not seen for stale_after_days.")
    stale: int = Field(description="Either of the two.")

    @property
    def share(self) -> float | None:
        return self.stale / self.total if self.total else None

    def describe(self, spec: TokenTable) -> str:
        share = f" ({self.share:.1%})" if self.share is not None else ""
        return (
            f"{self.stale} of {self.total} tokens in {spec.name} are stale{share}: "
            f"{self.invalid} marked invalid, {self.not_seen} not seen for "
            f"{spec.stale_after_days:g} days"
        )


@task(**pg_retries)
def survey_tokens(db: PostgresDatabase, spec: TokenTable) -> TokenSurvey:
    """Count all, invalid, not-seen and stale tokens (one statement)."""
    query = sql.SQL(
        "SELECT count(*), count(*) FILTER (WHERE {invalid}), count(*) FILTER (WHERE {not_seen}),"
        " count(*) FILTER (WHERE {stale}) FROM {table}"
    ).format(
        invalid=spec.invalid(),
        not_seen=spec.not_seen(),
        stale=spec.stale(),
        table=spec.identifier(),
    )
    with db.connect(autocommit=True) as conn:
        total, invalid, not_seen, stale = conn.execute(query, spec.params()).fetchone()
    return TokenSurvey(total=total, invalid=invalid, not_seen=not_seen, stale=stale)


class PruneResult(ChangeSet):
    """What a prune deleted, batch by batch."""

    deleted: int = 0
    batches: list[int] = Field(default_factory=list, description="Rows deleted per batch.")
    out_of_time: bool = False


def _change(spec: TokenTable, rows: int, **detail: object) -> Change:
    # the target names what is deleted, not how many: an approved plan is compared by it
    return Change(
        action="delete_stale_tokens",
        target=f"{spec.name} ({spec.criteria()})",
        detail={"rows": rows, **detail},
    )


@task(**pg_retries)
def prune_stale_tokens(
    db: PostgresDatabase, spec: TokenTable, batch_size: int, time_budget_s: float, dry_run: bool
) -> PruneResult:
    """Delete stale tokens, ``batch_size`` rows per statement, each its own transaction; no batch
    starts after ``time_budget_s``. Idempotent: a re-run finds only what is left.

    The role needs only SELECT and DELETE (``FOR UPDATE SKIP LOCKED`` would need UPDATE too): a
    row the dispatcher holds is waited for, within the block's statement timeout, and deleted only
    if it is still stale once the dispatcher commits (a token seen again is kept)."""
    survey = survey_tokens.fn(db, spec)
    result = PruneResult(dry_run=dry_run)
    if not survey.stale:
        return result
    result.planned.append(
        _change(spec, survey.stale, invalid=survey.invalid, not_seen=survey.not_seen)
    )
    if dry_run:
        return result
    batch = sql.SQL(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY("
        "SELECT ctid FROM {table} WHERE {stale} LIMIT %(n)s)) AND {stale}"
    ).format(table=spec.identifier(), stale=spec.stale())
    deadline = time.monotonic() + time_budget_s
    with db.connect(autocommit=True) as conn:
        while True:
            if time.monotonic() >= deadline:
                result.out_of_time = True
                break
            deleted = conn.execute(batch, spec.params(n=batch_size)).rowcount
            if deleted:
                result.batches.append(deleted)
                result.deleted += deleted
            if deleted < batch_size:
                break
    result.applied.append(_change(spec, result.deleted, batches=len(result.batches)))
    if result.out_of_time:
        result.notes.append(
            f"time budget of {time_budget_s:g}s ended after {result.deleted} token(s): the next "
            "run continues"
        )
    return result
