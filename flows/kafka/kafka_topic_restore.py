"""Kafka runbook ``kafka-topic-restore``: seed 003 disaster recovery "data corruption: restore
from latest backup".

Restore a backup made by ``kafka-topic-backup`` into a topic (the same name or a new one): each
record to its partition, in order, with key, value, headers and timestamp; exactly once, also when
a run is interrupted and run again. Writes to a topic, so approval always; into a target that
already holds records (its consumers would read the restored ones after them) the approver must
also type the topic's name on the approval form, and a wrong name writes nothing. Verified by
reading the target back: counts and checksums per segment against the manifest.
"""

from prefect import flow
from pydantic import BaseModel, Field

from blocks.backup_store import BackupStore
from blocks.kafka import KafkaCluster
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, OptionalTopicName, RunbookParams, TopicName
from runbooks.report import Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from tasks.kafka import get_cluster_id
from tasks.kafka_backup_format import OptionalBackupId
from tasks.kafka_backup_s3 import load_manifest
from tasks.kafka_restore import RestoreCheck, RestoreResult, check_restore, restore_topic

RESTORE_BUDGET = Budget(max_actions=3, window_s=3600)


class KafkaTopicRestoreParams(RunbookParams):
    """Parameters of the kafka-topic-restore runbook."""

    kafka_block: BlockName = Field(
        "default", description="Name of the Runbooks Kafka Cluster block."
    )
    backup_store_block: BlockName = Field(
        "default", description="Name of the Runbooks Backup Store block (the S3 bucket)."
    )
    topic: TopicName = Field("match-events-raw", description="The topic the backup was made of.")
    backup_id: OptionalBackupId = Field(
        None, description="Which backup (e.g. 20260105T030000Z); empty: the newest complete one."
    )
    target_topic: OptionalTopicName = Field(
        None, description="Restore into this topic (created when missing); empty: the same name."
    )
    confirm_non_empty: bool = Field(
        False,
        description="No longer used (kept so saved parameters still load): restoring into a topic "
        "that holds records needs the approver to type the topic's name on the approval form.",
    )
    replication_factor: int = Field(
        3, ge=1, le=10, description="Replication factor of the target topic when it is created."
    )
    verify_timeout_s: float = Field(
        120, gt=0, le=3600, description="How long to read the target back for verification."
    )


class KafkaTopicRestoreResult(BaseModel):
    outcome: Outcome
    backup_id: str | None
    target_topic: str
    sent: dict[int, int] = Field(description="Records sent per partition by this run.")
    report: str


@flow(
    name="kafka-topic-restore",
    description="Restore a Kafka topic backup from S3 into a topic (same or new name), preserving "
    "partitions, order, keys, values, headers and timestamps; exactly once across interruptions; "
    "approval always (into a topic that holds records: the approver types its name); verified by "
    "counts and checksums.",
)
@ends_as_reported
def kafka_topic_restore(params: KafkaTopicRestoreParams) -> KafkaTopicRestoreResult:
    target_topic = params.target_topic or params.topic
    result: RestoreResult | None = None
    with incident_report(
        runbook="kafka-topic-restore", title="Kafka topic restore", severity="P2", params=params
    ) as report:
        kafka = KafkaCluster.load(params.kafka_block)
        store = BackupStore.load(params.backup_store_block)
        manifest = load_manifest(store, params.topic, params.backup_id)
        report.step(
            f"backup {manifest.backup_id} of {manifest.topic}: {manifest.records} records in "
            f"{len(manifest.partitions)} partition(s), completed {manifest.completed_at:%Y-%m-%d %H:%M} UTC"
            + (
                f"; topic configs recorded: {len(manifest.topic_configs.configs)}"
                if manifest.topic_configs is not None
                else "; no topic configs in it (made before backups recorded them, or the "
                "broker refused DescribeConfigs): a created target gets the broker's defaults"
            )
        )
        cluster_id = get_cluster_id(kafka)
        target = Target(
            "kafka-topic",
            f"{kafka.bootstrap_servers}/{target_topic}",
            f"{cluster_id}/{target_topic}" if cluster_id else "",
        )
        with report.guard(target) as guard:
            plans: list[RestoreResult] = []

            def run(dry_run: bool) -> RestoreResult:
                # the plan covers a target that holds records (the approver then types its
                # name); the restore writes into one only when the approved plan showed it so
                shown = bool(plans and plans[-1].target_records and not plans[-1].resumed)
                result = restore_topic(
                    kafka,
                    store,
                    params.topic,
                    dry_run,
                    backup_id=manifest.backup_id,
                    target_topic=target_topic,
                    into_non_empty=dry_run or shown,
                    replication_factor=params.replication_factor,
                )
                if dry_run:
                    plans.append(result)
                return result

            if params.confirm_non_empty:
                report.step(
                    "confirm_non_empty is no longer used: a target that holds records needs the "
                    "approver to type its name"
                )
            restored = guard.act(
                f"restore {manifest.topic}@{manifest.backup_id} into {target_topic}",
                run,
                budget=RESTORE_BUDGET,
                approval=lambda plan: _danger(plan),
                # records already there: the approver types the topic's name to write after them
                confirm=lambda plan: (
                    [plan.target_topic] if plan.target_records and not plan.resumed else []
                ),
            )
            assert isinstance(restored, RestoreResult)
            result = restored
            report.check(
                "target topic empty", not result.target_records, str(result.target_records)
            )
            if result.refused:
                raise Escalation(result.refused)
            if result.config_drift:
                report.step(
                    f"{target_topic} exists with other configs than the backed-up topic had (not "
                    "changed: its owner chose them): " + "; ".join(result.config_drift)
                )
            if result.already_there:
                report.step(
                    "an interrupted restore had put "
                    + ", ".join(f"[{p}] {n}" for p, n in sorted(result.already_there.items()))
                    + " record(s) in the target already: not sent again"
                )
            if params.dry_run:
                report.finish(
                    Outcome.PLANNED,
                    f"Would restore {_count(result)} record(s) into {target_topic}; nothing was sent.",
                )
            elif not result.planned:
                report.finish(
                    Outcome.NO_ACTION_NEEDED, "; ".join(result.notes) or "nothing to restore"
                )
            else:
                checked = guard.verify(
                    f"{target_topic} holds the backup's records",
                    lambda: check_restore(
                        kafka,
                        store,
                        params.topic,
                        manifest.backup_id,
                        target_topic,
                        result.start_offsets,
                    ),
                    lambda c: c.ok,
                    timeout_s=params.verify_timeout_s,
                    interval_s=2.0,
                    describe=lambda c: (
                        f"{sum(c.records.values())} of {sum(c.expected.values())} records"
                        + (f"; {'; '.join(c.problems[:3])}" if c.problems else "")
                    ),
                )
                check: RestoreCheck | None = checked.last
                if not checked.ok:
                    raise VerificationFailed(
                        f"{target_topic} does not hold the backup's records: "
                        + ("; ".join(check.problems[:5]) if check else "not read")
                    )
                report.finish(
                    Outcome.RESOLVED,
                    f"Restored {manifest.records} record(s) of backup {manifest.backup_id} into "
                    f"{target_topic} ({sum(result.sent.values())} sent by this run); counts and "
                    "checksums per partition match the manifest.",
                )
    return KafkaTopicRestoreResult(
        outcome=report.outcome or Outcome.FAILED,
        backup_id=result.backup_id if result else None,
        target_topic=target_topic,
        sent=result.sent if result else {},
        report=report.to_markdown(),
    )


def _count(plan: RestoreResult) -> int:
    return sum(c.detail.get("records", 0) for c in plan.planned)


def _danger(plan: RestoreResult) -> str:
    """Every restore writes into a topic its consumers read."""
    created = any(c.action == "create_topic" for c in plan.planned)
    return (
        f"{_count(plan)} records would be written into {plan.target_topic}"
        + (" (created for it)" if created else "")
        + (
            f", which already holds {plan.target_records} records: its consumers will read the "
            "restored ones after them"
            if plan.target_records
            else ""
        )
    )
