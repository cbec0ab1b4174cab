"""Runbook ``aws-resources-missing``: LocalStack (or AWS) lost its resources, e.g. after a restart
without persistence. Checks LocalStack's health when configured, compares the declared SQS queues
(with their dead-letter queues), SNS topics and subscriptions with the account, re-creates what is
missing, reports what drifted, and checks that the CloudWatch metrics that should publish still do.
"""

from datetime import UTC, datetime
from typing import Annotated, Self

from botocore.exceptions import BotoCoreError, ClientError
from prefect import flow
from pydantic import AfterValidator, BaseModel, Field, model_validator

from blocks.aws import AwsAccount
from runbooks.errors import Escalation, VerificationFailed
from runbooks.handoff import hand_off
from runbooks.params import (
    BlockName,
    OptionalPlatformRef,
    OptionalServiceName,
    RunbookParams,
    unique_names,
)
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Guard, Target
from tasks.aws_resources import (
    create_missing_resources,
    read_aws_resources,
    read_localstack_health,
    read_metric_activity,
)
from tasks.aws_resources_decisions import (
    Action,
    AwsResources,
    MetricDecision,
    MetricSpec,
    MetricStatus,
    OptionalQueueName,
    OptionalTopicName,
    QueueSpec,
    ResourceDecision,
    Status,
    TopicSpec,
    decide_all,
    decide_metric,
    declared_dead_letter_queues,
    health_problems,
)

RUNBOOK = "aws-resources-missing"

# Resources that vanish again and again are deleted by something (a LocalStack without
# persistence restarting, a teardown script): a person finds it.
CREATE_BUDGET = Budget(max_actions=3, window_s=3600)

# in this order: a redrive policy names its dead-letter queue's ARN, a subscription its queue's
STEPS = [
    (Action.CREATE_QUEUE, "re-create missing queues"),
    (Action.SET_REDRIVE_POLICY, "set missing redrive policies"),
    (Action.CREATE_TOPIC, "re-create missing topics"),
    (Action.SUBSCRIBE, "re-create missing subscriptions"),
]


class AwsResourcesMissingParams(RunbookParams):
    """Run form of the aws-resources-missing runbook."""

    aws_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks AWS Account' block."
    )
    queues: Annotated[
        list[QueueSpec], AfterValidator(unique_names), AfterValidator(declared_dead_letter_queues)
    ] = Field(
        default_factory=list,
        description="The declared SQS queues: name, attributes, dead_letter_queue (declared too), "
        "max_receive_count.",
    )
    topics: Annotated[list[TopicSpec], AfterValidator(unique_names)] = Field(
        default_factory=list,
        description="The declared SNS topics: name, attributes, subscriptions (protocol, endpoint; "
        "an sqs endpoint may name a declared queue).",
    )
    metrics: list[MetricSpec] = Field(
        default_factory=list,
        description="CloudWatch metrics that should keep publishing: namespace, name, dimensions, "
        "max_age_s.",
    )
    queue: OptionalQueueName = Field(
        None, description="The queue the alert names (label queue_name); it must be declared."
    )
    topic: OptionalTopicName = Field(
        None, description="The topic the alert names (label topic_name); it must be declared."
    )
    platform: OptionalPlatformRef = Field(
        None,
        description="Where LocalStack runs (docker/<block>, kubernetes/<block>, supervisord/<block>): "
        "with `service`, an endpoint that does not answer is handed to service-not-responding, "
        "which restarts it; this runbook then re-creates the resources on its next run.",
    )
    service: OptionalServiceName = Field(
        None, description="LocalStack's service (Compose service, Deployment, program) on `platform`."
    )
    verify_timeout_s: float = Field(
        30, gt=0, le=600, description="How long to wait for the account to show what was created."
    )

    @model_validator(mode="after")
    def _something_declared(self) -> Self:
        if not (self.queues or self.topics or self.metrics):
            raise ValueError("nothing declared: set queues, topics or metrics")
        return self


class AwsResourcesMissingSummary(BaseModel):
    """What an aws-resources-missing run found and did."""

    outcome: Outcome
    decisions: list[ResourceDecision] = Field(description="Per declared resource, as first read.")
    metrics: list[MetricDecision] = Field(default_factory=list)
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name=RUNBOOK,
    description="Check LocalStack/AWS: re-create missing SQS queues (with redrive policies), SNS "
    "topics and subscriptions from their spec; report drift and CloudWatch metrics that stopped.",
)
@ends_as_reported
def aws_resources_missing(params: AwsResourcesMissingParams) -> AwsResourcesMissingSummary:
    with incident_report(
        runbook=RUNBOOK, title="AWS Resources Missing", severity="P2", params=params
    ) as report:
        account = AwsAccount.load(params.aws_block)
        _check_health(report, account)
        live = _read_or_escalate(report, params, account)
        if isinstance(live, str):
            report.finish(
                Outcome.HANDED_OFF,
                f"{account.endpoint()} does not answer: handed to service-not-responding, which "
                f"restarts {params.service} on {params.platform} ({live}). Nothing was created; "
                "run this runbook again once it answers (its alert fires again while resources "
                "are missing).",
            )
            return AwsResourcesMissingSummary(
                outcome=report.outcome, decisions=[], report=report.to_markdown()
            )
        where = live.location.describe()
        decisions = decide_all(params.queues, params.topics, live)
        _record(report, decisions)
        metrics = _check_metrics(report, params, account)
        unknown = _undeclared(params)
        left = _left_for_a_person(decisions, metrics, unknown)
        missing = [d for d in decisions if d.status is Status.MISSING]
        if not missing:
            if left:
                _advise(report, decisions, metrics)
                raise Escalation(f"{where}: " + "; ".join(left))
            report.finish(
                Outcome.NO_ACTION_NEEDED,
                f"Every declared resource exists as declared in {where}"
                + (f"; {len(metrics)} metric(s) publishing." if metrics else "."),
            )
            return _summary(report, decisions, metrics)

        location = live.location
        # one lock and budget per account and region, and per endpoint: each LocalStack its own
        identity = f"{location.account}/{location.region}@{location.endpoint or 'aws'}"
        target = Target("aws", where, identity)
        with report.guard(target) as guard:
            wanted = {d.action for d in missing}
            for action, label in STEPS:
                if action in wanted:
                    guard.act(
                        label,
                        lambda dry_run, action=action: create_missing_resources(
                            account, params.queues, params.topics, action, dry_run
                        ),
                        budget=CREATE_BUDGET,
                    )
            _advise(report, decisions, metrics)
            if params.dry_run:
                if left:
                    raise Escalation(f"{where}: " + "; ".join(left))
                report.finish(
                    Outcome.PLANNED,
                    f"Would re-create {len(missing)} missing resource(s) in {where}.",
                )
                return _summary(report, decisions, metrics)
            _verify(report, guard, account, params)
        created = ", ".join(f"{d.kind.value} {d.name}" for d in missing)
        if left:
            raise Escalation(
                f"{where}: re-created {created}; left for a person: " + "; ".join(left)
            )
        report.finish(Outcome.RESOLVED, f"Re-created {created} in {where} (read back).")
        return _summary(report, decisions, metrics)


def _check_health(report: IncidentReport, account: AwsAccount) -> None:
    """LocalStack's own view, when it has one; the API calls after it are what count."""
    if not account.health_url:
        report.step("no health URL in the block (AWS or moto): the API answers are the check")
        return
    try:
        health = read_localstack_health(account)
    except Exception as exc:  # noqa: BLE001 - any failure to read health is a finding, not the end
        report.check(
            "LocalStack health", False, f"{account.health_url}: {type(exc).__name__}: {exc}"
        )
        return
    report.evidence("LocalStack health", health)
    problems = health_problems(health)
    report.check(
        "LocalStack health",
        not problems,
        "; ".join(problems)
        or "sqs, sns, cloudwatch running or available"
        + (f" (LocalStack {health['version']})" if health.get("version") else ""),
    )


def _read_or_escalate(
    report: IncidentReport, params: AwsResourcesMissingParams, account: AwsAccount
) -> AwsResources | str:
    """The declared resources as they are; a link to the service-not-responding run when the
    endpoint does not answer and where it runs is known; otherwise an escalation."""
    where = account.endpoint() or f"AWS {account.region_name() or '(default region)'}"
    try:
        return read_aws_resources(account, params.queues, params.topics)
    except ClientError as exc:
        report.check("AWS API", False, f"{where}: {exc}")
        report.follow_ups.append(
            f"Check the credentials of the AWS block '{params.aws_block}' and their permissions "
            "(sts:GetCallerIdentity, sqs:GetQueueUrl/GetQueueAttributes/CreateQueue/"
            "SetQueueAttributes, sns:GetTopicAttributes/ListSubscriptionsByTopic/CreateTopic/"
            "Subscribe, cloudwatch:GetMetricData/ListMetrics)."
        )
        raise Escalation(f"{where} refused a request ({exc}); nothing was changed") from None
    except BotoCoreError as exc:
        report.check("AWS API", False, f"{where}: {type(exc).__name__}: {exc}")
        if params.platform and params.service and account.endpoint():
            link = hand_off(
                "service-not-responding",
                params,
                {"platform": params.platform, "service": params.service},
            )
            report.step(f"handed to service-not-responding for {params.service}: {link}")
            return link
        report.follow_ups.append(
            f"Start or restart the endpoint ({where}; for LocalStack: docker-compose restart "
            "localstack), then run this runbook again: it re-creates the declared resources. "
            "LocalStack's persistence (PERSISTENCE=1) keeps them across restarts."
        )
        raise Escalation(f"{where} does not answer ({exc}); nothing was changed") from None


def _record(report: IncidentReport, decisions: list[ResourceDecision]) -> None:
    for d in decisions:
        report.check(f"{d.kind.value} {d.name}", d.status is Status.OK, d.describe())


def _check_metrics(
    report: IncidentReport, params: AwsResourcesMissingParams, account: AwsAccount
) -> list[MetricDecision]:
    if not params.metrics:
        return []
    now = datetime.now(UTC)
    states = read_metric_activity(account, params.metrics, now)
    decisions = [decide_metric(m, s, now) for m, s in zip(params.metrics, states, strict=True)]
    report.evidence("CloudWatch metrics", [s.model_dump(mode="json") for s in states])
    for d in decisions:
        report.check(f"metric {d.metric}", d.status is MetricStatus.PUBLISHING, d.detail)
    return decisions


def _undeclared(params: AwsResourcesMissingParams) -> list[str]:
    """The alert's queue or topic, when the spec does not declare it: it cannot be re-created."""
    out = []
    if params.queue and params.queue not in {q.name for q in params.queues}:
        out.append(f"the alert names queue {params.queue}, which is not declared")
    if params.topic and params.topic not in {t.name for t in params.topics}:
        out.append(f"the alert names topic {params.topic}, which is not declared")
    return out


def _left_for_a_person(
    decisions: list[ResourceDecision], metrics: list[MetricDecision], unknown: list[str]
) -> list[str]:
    left = [
        f"{d.kind.value} {d.name} drifted: {d.describe()}"
        for d in decisions
        if d.status is Status.DRIFTED
    ]
    left += [
        f"metric {m.metric} {m.status.value}"
        for m in metrics
        if m.status is not MetricStatus.PUBLISHING
    ]
    return left + unknown


def _verify(
    report: IncidentReport, guard: Guard, account: AwsAccount, params: AwsResourcesMissingParams
) -> None:
    def missing(live: AwsResources) -> list[str]:
        return [
            f"{d.kind.value} {d.name}"
            for d in decide_all(params.queues, params.topics, live)
            if d.status is Status.MISSING
        ]

    check = guard.verify(
        "declared resources read back",
        lambda: read_aws_resources(account, params.queues, params.topics),
        lambda live: not missing(live),
        timeout_s=params.verify_timeout_s,
        describe=lambda live: (
            ", ".join(missing(live)) + " still missing"
            if missing(live)
            else "every declared resource exists"
        ),
    )
    if not check.ok:
        raise VerificationFailed(
            "still missing after re-creating: "
            + ", ".join(missing(check.last) if check.last else [])
        )


def _advise(
    report: IncidentReport, decisions: list[ResourceDecision], metrics: list[MetricDecision]
) -> None:
    if any(d.status is Status.DRIFTED for d in decisions):
        report.follow_ups.append(
            "Drifted attributes were left as they are (someone may have changed them on purpose): "
            "set them back (aws sqs set-queue-attributes / sns set-topic-attributes) or update "
            "the spec."
        )
    if any(m.status is not MetricStatus.PUBLISHING for m in metrics):
        report.follow_ups.append(
            "A metric stopped: check the publishing application's logs for CloudWatch/SQS/SNS "
            "errors (it may have failed while the resources were missing) and restart it if it "
            "does not recover; check its endpoint and credentials settings."
        )
    if any(d.status is Status.MISSING for d in decisions):
        report.follow_ups.append(
            "Resources disappeared: for LocalStack turn on persistence (PERSISTENCE=1) and keep "
            "the setup script in the container's init hooks, so a restart does not lose them."
        )


def _summary(
    report: IncidentReport, decisions: list[ResourceDecision], metrics: list[MetricDecision]
) -> AwsResourcesMissingSummary:
    return AwsResourcesMissingSummary(
        outcome=report.outcome, decisions=decisions, metrics=metrics, report=report.to_markdown()
    )
