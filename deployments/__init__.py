"""Deployments: `prefect.yaml` is the one declaration; this package turns it into deployments."""

from deployments.catalog import RunbookSpec, load_catalog, to_runner_deployments

__all__ = ["RunbookSpec", "load_catalog", "to_runner_deployments"]
