"""Kafka runbook ``kafka-topic-backup``: seed 003 disaster recovery "backup Kafka topics".

Copy every record of a topic (or an offset/time range of it) with key, value, headers, timestamp,
partition and offset into compressed segment objects in S3, then a manifest with counts and
checksums per partition; check the backup against its manifest. An interrupted backup is
continued by the next run (progress is what S3 holds). Weekly on a schedule, or by hand.
"""

from datetime import datetime

from prefect import flow
from pydantic import BaseModel, Field

from blocks.backup_store import BackupStore
from blocks.kafka import KafkaCluster
from runbooks.errors import VerificationFailed
from runbooks.params import BlockName, RunbookParams, TopicName
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from tasks.kafka import get_cluster_id
from tasks.kafka_backup import BackupCheck, BackupResult, backup_topic, check_backup
from tasks.kafka_backup_format import OptionalBackupId
from tasks.pushgateway import OptionalPushgatewayUrl, push_gauges

# A backup is cheap to repeat but each one is a full copy: a few a day is plenty.
BACKUP_BUDGET = Budget(max_actions=6, window_s=86400)


class KafkaTopicBackupParams(RunbookParams):
    """Parameters of the kafka-topic-backup runbook."""

    kafka_block: BlockName = Field(
        "default", description="Name of the Runbooks Kafka Cluster block."
    )
    backup_store_block: BlockName = Field(
        "default", description="Name of the Runbooks Backup Store block (the S3 bucket)."
    )
    topic: TopicName = Field("match-events-raw", description="The topic to back up.")
    from_offset: int | None = Field(
        None,
        ge=0,
        description="Back up from this offset on, in every partition; empty: the earliest.",
    )
    to_offset: int | None = Field(
        None,
        ge=0,
        description="Back up offsets below this one, in every partition; empty: to the end.",
    )
    from_time: datetime | None = Field(None, description="Back up records from this time on.")
    to_time: datetime | None = Field(None, description="Back up records before this time.")
    backup_id: OptionalBackupId = Field(
        None,
        description="Continue this backup (e.g. 20260105T030000Z); empty: continue an interrupted "
        "backup of the same range if there is one, else start a new one.",
    )
    segment_mb: int = Field(
        16, ge=1, le=1024, description="Records per segment object, in MB before compression."
    )
    deep_check: bool = Field(
        False, description="After the backup, download every segment and recompute its checksums."
    )
    pushgateway_url: OptionalPushgatewayUrl = Field(
        None,
        description="Prometheus Pushgateway to push the last successful backup's time to "
        "(the KafkaTopicBackupMissing alert reads it); empty: nothing pushed.",
    )


class KafkaTopicBackupResult(BaseModel):
    outcome: Outcome
    backup_id: str | None
    location: str | None
    records: int = Field(description="Records in the backup (all runs of it).")
    report: str


@flow(
    name="kafka-topic-backup",
    description="Back up a Kafka topic (or an offset/time range) to S3: compressed segments with "
    "every record's key, value, headers, timestamp, partition and offset, and a manifest with counts "
    "and checksums; resumes an interrupted backup.",
)
@ends_as_reported
def kafka_topic_backup(params: KafkaTopicBackupParams) -> KafkaTopicBackupResult:
    backup: BackupResult | None = None
    records = 0
    with incident_report(
        runbook="kafka-topic-backup", title="Kafka topic backup", severity="P4", params=params
    ) as report:
        kafka = KafkaCluster.load(params.kafka_block)
        store = BackupStore.load(params.backup_store_block)
        cluster_id = get_cluster_id(kafka)
        location = f"s3://{store.bucket}/{store.prefix}/{params.topic}"
        target = Target(
            "kafka-topic-backup",
            f"{params.topic} -> {location}",
            f"{cluster_id}/{params.topic} -> {location}" if cluster_id else "",
        )
        with report.guard(target) as guard:

            def run(dry_run: bool) -> BackupResult:
                return backup_topic(
                    kafka,
                    store,
                    params.topic,
                    dry_run,
                    from_offset=params.from_offset,
                    to_offset=params.to_offset,
                    from_time=params.from_time,
                    to_time=params.to_time,
                    backup_id=params.backup_id,
                    segment_bytes=params.segment_mb * 1024 * 1024,
                )

            result = guard.act(f"back up {params.topic}", run, budget=BACKUP_BUDGET)
            assert isinstance(result, BackupResult)
            backup = result
            if result.resumed:
                report.step(f"continued the interrupted backup {result.location}")
            if params.dry_run:
                report.finish(
                    Outcome.PLANNED,
                    f"Would back up {_planned_records(result)} record(s) at most of {params.topic} "
                    f"to {result.location}; nothing was written.",
                )
            elif result.complete_before:
                report.finish(
                    Outcome.NO_ACTION_NEEDED, f"Backup {result.location} was complete already."
                )
            else:
                records = _verify(report, guard, store, params, result)
                _push_metrics(report, params, result)
    return KafkaTopicBackupResult(
        outcome=report.outcome or Outcome.FAILED,
        backup_id=backup.backup_id if backup else None,
        location=backup.location if backup else None,
        records=records,
        report=report.to_markdown(),
    )


def _planned_records(result: BackupResult) -> int:
    return sum(c.detail.get("records_at_most", 0) for c in result.planned)


def _verify(
    report: IncidentReport,
    guard,
    store: BackupStore,
    params: KafkaTopicBackupParams,
    result: BackupResult,
) -> int:
    checked = guard.verify(
        "backup objects match the manifest",
        lambda: check_backup(store, params.topic, result.backup_id, params.deep_check),
        lambda c: c.ok,
        timeout_s=5,
        describe=lambda c: (
            f"{c.segments} segments, {c.records} records"
            + (f"; problems: {'; '.join(c.problems[:3])}" if c.problems else "")
        ),
        give_up=lambda c: not c.ok,
    )
    check: BackupCheck | None = checked.last
    if not checked.ok or check is None:
        raise VerificationFailed(
            f"backup {result.location} does not match its manifest: "
            + ("; ".join(check.problems[:5]) if check else "not checked")
        )
    manifest = result.manifest
    assert manifest is not None
    report.evidence(
        "partitions backed up",
        {p: s.model_dump(mode="json") for p, s in manifest.partitions.items()},
    )
    if manifest.topic_configs is not None:
        report.evidence(
            f"topic configs recorded ({manifest.topic_configs.which})",
            manifest.topic_configs.configs,
        )
    else:
        report.step(
            "the topic's configs are not in the backup (the broker refused DescribeConfigs, or an "
            "older run planned it): a restore creates a missing topic with the broker's defaults"
        )
    report.finish(
        Outcome.RESOLVED,
        f"Backed up {manifest.records} record(s) of {params.topic} in {len(manifest.segments)} "
        f"segment(s), {manifest.bytes / 1e6:.1f} MB, to {result.location} ({result.records} written "
        f"by this run in {result.elapsed_s:.1f} s); the manifest's counts and checksums match"
        + (" every segment's content" if params.deep_check else " the objects")
        + ".",
    )
    return manifest.records


def _push_metrics(
    report: IncidentReport, params: KafkaTopicBackupParams, result: BackupResult
) -> None:
    """The time of the last good backup, for the alert on a missing backup."""
    if not params.pushgateway_url or result.manifest is None:
        return
    error = push_gauges(
        params.pushgateway_url,
        job="runbooks-kafka-topic-backup",
        grouping_key={"kafka_cluster": params.kafka_block, "topic": params.topic},
        gauges={
            "runbooks_kafka_topic_backup_last_success_timestamp_seconds": (
                "When the last complete backup of the topic finished.",
                result.manifest.completed_at.timestamp(),
            ),
            "runbooks_kafka_topic_backup_records": (
                "Records in the last backup.",
                result.manifest.records,
            ),
        },
    )
    if error is None:
        report.step(f"pushed the backup's time to {params.pushgateway_url}")
    else:  # the backup is good; the alert may fire: say why
        report.step(f"could not push the backup's time to {params.pushgateway_url}: {error}")
