"""Spark runbooks: one module per deployment, named for it."""
