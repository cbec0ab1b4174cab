"""What a busy lock's holder record says: wait, release the stale lease, or defer to an approval."""

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import StateType

from runbooks.locks import HolderStatus, LockHolder, judge_holder, process_start_time

NOW = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)


def holder(run: bool = True, approval_in_s: float | None = None) -> LockHolder:
    return LockHolder(
        lease_id=uuid4(),
        flow_run_id=uuid4() if run else None,
        since=NOW - timedelta(minutes=1),
        awaiting_approval_until=NOW + timedelta(seconds=approval_in_s)
        if approval_in_s is not None
        else None,
    )


CASES = [
    # (holder, run state, run found, process alive, expected)
    (None, None, True, None, HolderStatus.UNKNOWN),
    (holder(), StateType.RUNNING, True, True, HolderStatus.ACTIVE),
    (holder(), StateType.RUNNING, True, None, HolderStatus.ACTIVE),  # other host: lease decides
    (holder(), StateType.RUNNING, True, False, HolderStatus.DEAD),  # SIGKILLed on this host
    (holder(), StateType.PENDING, True, False, HolderStatus.DEAD),
    (holder(), StateType.COMPLETED, True, True, HolderStatus.FINISHED),
    (holder(), StateType.FAILED, True, None, HolderStatus.FINISHED),
    (holder(), StateType.CRASHED, True, None, HolderStatus.FINISHED),
    (holder(), StateType.CANCELLED, True, None, HolderStatus.FINISHED),
    (holder(), None, False, None, HolderStatus.FINISHED),  # run deleted
    (holder(approval_in_s=300), StateType.PAUSED, True, None, HolderStatus.AWAITING_APPROVAL),
    # suspended, no process by design: never "dead"
    (holder(approval_in_s=300), StateType.PAUSED, True, False, HolderStatus.AWAITING_APPROVAL),
    # deadline passed: the timeout service resumes it to escalate; its lease still holds
    (holder(approval_in_s=-5), StateType.PAUSED, True, None, HolderStatus.ACTIVE),
    (holder(run=False), None, True, False, HolderStatus.DEAD),  # no flow run (direct call)
    (holder(run=False), None, True, None, HolderStatus.ACTIVE),
]


@pytest.mark.parametrize("record,state,found,alive,expected", CASES)
def test_judge_holder(record, state, found, alive, expected):
    assert judge_holder(record, state, found, alive, NOW) is expected


def test_process_start_time_tells_processes_apart():
    import os

    mine = process_start_time(os.getpid())
    assert mine is not None and mine.isdigit()
    assert process_start_time(1) != mine
    assert process_start_time(2**22 + 12345) is None  # beyond pid_max: no such process
