"""Runbooks that read metrics and alerts: SLOs, health sweeps, maintenance reports."""
