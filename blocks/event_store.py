"""Where an event-processing service keeps its events, and what "stuck" means there."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from blocks.fields import BLOCK_CONFIG
from blocks.postgres import PostgresDatabase


class EventStore(Block):
    """A PostgreSQL table of events that consumers move PENDING -> PROCESSING -> done.

    A consumer that dies mid-event leaves its row in PROCESSING forever; the
    `event-processing-stuck` runbook puts such rows back to PENDING.

    Example:
        ```python
        from blocks.event_store import EventStore
        store = EventStore.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "Runbooks Event Store"
    _block_type_slug = "runbooks-event-store"
    _description = "Table, columns and status values of events kept in PostgreSQL."
    model_config = BLOCK_CONFIG

    database: PostgresDatabase = Field(description="The PostgreSQL database holding the table.")
    schema_name: str = Field("public", description="Schema of the events table.")
    table: str = Field("events", description="Name of the events table.")
    id_column: str = Field(
        "id",
        description="Primary key column; batches are taken in its order, each after the last.",
    )
    status_column: str = Field("status", description="Column holding the event's status.")
    updated_at_column: str = Field(
        "updated_at",
        description="timestamptz column the consumer sets whenever it changes the status.",
    )
    processing_status: str = Field("PROCESSING", description="Status of an event being worked on.")
    pending_status: str = Field("PENDING", description="Status of an event waiting for a consumer.")
    stuck_after_s: float = Field(
        3600.0,
        gt=0,
        le=30 * 86400,
        description="An event PROCESSING for longer than this many seconds is stuck (seed: 1 hour).",
    )
    batch_size: int = Field(
        500,
        ge=1,
        le=100_000,
        description="Rows in the first transaction; the next ones grow or shrink (up to "
        "max_batch_size) so that each takes about batch_target_ms.",
    )
    max_batch_size: int = Field(
        20_000, ge=1, le=100_000, description="Most rows reset in one transaction."
    )
    batch_target_ms: float = Field(
        75.0,
        ge=1,
        le=10_000,
        description="How long each transaction should take: its rows stay locked that long, so a "
        "consumer touching one of them waits at most about this.",
    )
    parallel_ranges: int = Field(
        2,
        ge=1,
        le=16,
        description="A large backlog (over 100,000 stuck events left after the first batches) is "
        "split into this many ranges of ids, each reset in its own batches on its own "
        "connection, at the same time; 1 resets in one sequence of batches.",
    )
    time_budget_s: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="A run starts no new batch after this many seconds; it reports how many "
        "events it reset and how many are left, escalates, and the next run continues.",
    )
