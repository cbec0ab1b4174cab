"""Stadium edge gateway: where its write-ahead log lives and which Kafka topic it feeds."""

from __future__ import annotations

from pathlib import Path

from prefect.blocks.core import Block
from pydantic import Field

from blocks.fields import BLOCK_CONFIG


class EdgeGateway(Block):
    """An edge gateway that buffers events in a write-ahead log while Kafka is unreachable.

    The WAL format is described in docs/wal-format.md.

    Example:
        ```python
        from blocks.edge_gateway import EdgeGateway
        gateway = EdgeGateway.load("BLOCK_NAME")
        print(gateway.wal_path(), gateway.topic)
        ```
    """

    _block_type_name = "Runbooks Edge Gateway"
    _block_type_slug = "runbooks-edge-gateway"
    _description = (
        "WAL directory, Kafka cluster and topic, and buffer capacity of a stadium edge gateway."
    )
    model_config = BLOCK_CONFIG

    gateway_name: str = Field(
        description="Name of the gateway, e.g. 'wembley-gw-1' (reports, Kafka headers)."
    )
    wal_directory: str = Field(
        description="Directory of the gateway's write-ahead log on this host."
    )
    kafka_block: str = Field(
        "default", description="Name of the Runbooks Kafka Cluster block the gateway feeds."
    )
    topic: str = Field(
        "match-events-raw", description="Kafka topic the gateway produces events to."
    )
    capacity_events: int = Field(
        10_000, ge=1, le=100_000_000, description="Events the WAL can buffer (seed 000: ~10,000)."
    )
    capacity_bytes: int = Field(
        1024**3, ge=1, le=1024**4, description="Bytes the WAL can buffer (seed 000: ~1 GB)."
    )
    delivery_timeout_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="How long a batch of drained records may wait for the broker's confirmation "
        "before the drain stops (the marker stays put; a retry resumes from it).",
    )
    delete_delivered_segments: bool = Field(
        False,
        description="After a drain, delete segment files whose records are all in Kafka "
        "(never the newest one). Leave off when the gateway manages its own retention.",
    )

    def wal_path(self) -> Path:
        return Path(self.wal_directory)
