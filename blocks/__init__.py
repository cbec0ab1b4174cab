"""Prefect Blocks: configuration of the systems runbooks act on. Configuration only; each builds its client."""

from blocks.kafka import KafkaCluster

__all__ = ["KafkaCluster"]
