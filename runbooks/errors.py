"""Domain errors that end a runbook run in a clear FAILED state."""


class Escalation(RuntimeError):
    """Automation must stop here and a human must take over (e.g. a cluster-wide outage)."""


class VerificationFailed(RuntimeError):
    """The fix was applied but the symptom did not clear before the deadline."""
