"""The toolkit a runbook author uses.

Guard rails (`runbooks.safety`), the incident report (`runbooks.report`), the audit trail
(`runbooks.audit`), escalation, parameters, change sets, task options, bounded polling, errors.
The machinery that serves runs (CLI, warm start, event pickup, SQLite server) is in `serving`.
Kept import-free: import from the submodules, e.g. `runbooks.report`, `runbooks.safety`.
"""
