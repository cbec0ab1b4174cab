"""The machinery that serves runbook runs: the `runbooks` CLI, warm start, event pickup, SQLite server.

Kept import-free on purpose: `serving.cli` must set Prefect's environment (API URL, home)
before anything imports prefect. Import from the submodules.
"""
