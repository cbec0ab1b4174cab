"""Shared machinery for runbook flows.

Kept import-free on purpose: `runbooks.cli` must set Prefect's environment (API URL, home)
before anything imports prefect. Import from the submodules: `runbooks.report`,
`runbooks.results`, `runbooks.retry`, `runbooks.waiting`, `runbooks.params`, `runbooks.errors`.
"""
