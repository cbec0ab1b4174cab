"""Domain errors that end a runbook run: an escalation, a failed verification, a busy target, a
duplicate alert run."""


class Escalation(RuntimeError):
    """Automation must stop here and a human must take over (e.g. a cluster-wide outage)."""


class VerificationFailed(RuntimeError):
    """The fix was applied but the symptom did not clear before the deadline."""


class TargetBusy(RuntimeError):
    """Another run holds the target's lock and this run was told not to wait (or waited enough).

    ``escalate``: the run gave up waiting, so nobody may be fixing the symptom; a human is told.
    """

    def __init__(self, message: str, *, escalate: bool = False):
        super().__init__(message)
        self.escalate = escalate


class DuplicateAlertRun(RuntimeError):
    """Another run already has this alert event from the same automation (runbooks.alert_claims):
    Prefect delivered the event twice. This run stops before acting; nobody is paged."""


class BudgetSpent(Escalation):
    """The remediation budget for this target is spent; a human must look."""

    def __init__(self, message: str, *, notify: bool):
        super().__init__(message)
        self.notify = notify


class ApprovalRejected(Escalation):
    """A human rejected a destructive step."""


class ApprovalTimedOut(Escalation):
    """Nobody answered the approval request in time; treated as a rejection."""
