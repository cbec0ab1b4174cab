"""Kafka runbooks: one module per deployment, named for it."""
