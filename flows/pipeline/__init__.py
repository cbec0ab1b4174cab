"""Runbooks of the event pipeline as a whole (gateway -> Kafka -> Flink -> notifications)."""
