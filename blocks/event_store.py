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
    id_column: str = Field("id", description="Primary key column; batches are taken in its order.")
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
        500, ge=1, le=10_000, description="Rows reset per transaction; small keeps locks short."
    )
    max_batches: int = Field(
        100,
        ge=1,
        le=10_000,
        description="At most this many batches per run; the next run continues.",
    )
