"""Crash-test victim: archive old events to S3 and die by SIGKILL between an object's upload and
its batch's commit.

Run by tests/integration/test_archive_old_events_s3.py as
``python -m tests.event_archive_victim EVENT_STORE_BLOCK S3_ENDPOINT BUCKET PREFIX KILL_AFTER_PUTS``
with PREFECT_API_URL set to the test server. The kill is real (SIGKILL to this process as the Nth
archive object's PutObject returns: the object is in S3, its rows are locked and not yet deleted,
the transaction never commits).
"""

from __future__ import annotations

import sys

from blocks.event_store import EventStore
from tasks.event_archive import ArchiveSpec, archive_table_name, server_cutoff
from tasks.event_archive_s3 import OBJECT_SUFFIX, archive_old_events_to_s3
from tests.kafka_backup_victim import _DyingStore
from tests.moto_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY


def main(block: str, endpoint: str, bucket: str, prefix: str, kill_after: str) -> None:
    store = EventStore.load(block)
    backup = _DyingStore(
        bucket=bucket,
        endpoint_url=endpoint,
        region=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        kill_after_puts=int(kill_after),
        victim_suffix=OBJECT_SUFFIX,
    )
    spec = ArchiveSpec(
        archive_table=archive_table_name(store.table, None),
        time_column=store.updated_at_column,
        statuses=["COMPLETED", "FAILED"],
        cutoff=server_cutoff.fn(store, 90),
        older_than_days=90,
        time_budget_s=120,
    )
    archive_old_events_to_s3.fn(store, backup, spec, bucket, prefix, dry_run=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.exit("the victim was not killed")
