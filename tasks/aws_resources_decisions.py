"""Declared AWS resources against what the account has: SQS queues (with their dead-letter queue),
SNS topics and subscriptions, CloudWatch metrics that should keep publishing, and LocalStack's
health. Pure: the specs, the live states and the decisions, tested with tables.

What is missing is re-created (a queue, its redrive policy, a topic, a subscription); what exists
but differs from the spec is reported, never changed: another attribute may be someone's fix.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, model_validator

from runbooks.results import Change

# --- names (alert labels are data: checked before they reach an API) -----------------------

_QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]+(\.fifo)?")
_TOPIC_NAME = re.compile(r"[A-Za-z0-9_-]+(\.fifo)?")


def queue_name_problem(name: str) -> str | None:
    """Why ``name`` is not an SQS queue name (1-80 letters, digits, '-', '_'; '.fifo' suffix)."""
    if len(name) > 80 or not _QUEUE_NAME.fullmatch(name):
        return f"{name[:90]!r} is not an SQS queue name (1-80 letters, digits, '-', '_', optional .fifo)"
    return None


def topic_name_problem(name: str) -> str | None:
    """Why ``name`` is not an SNS topic name (1-256 letters, digits, '-', '_'; '.fifo' suffix)."""
    if len(name) > 256 or not _TOPIC_NAME.fullmatch(name):
        return f"{name[:90]!r} is not an SNS topic name (1-256 letters, digits, '-', '_', optional .fifo)"
    return None


def _checked(problem: Any) -> Any:
    def check(value: str | None) -> str | None:
        reason = None if value is None else problem(value)
        if reason:
            raise ValueError(reason)
        return value

    return AfterValidator(check)


_EMPTY_IS_NONE = BeforeValidator(lambda v: None if v in ("", "None") else v)
QueueName = Annotated[str, _checked(queue_name_problem)]
TopicName = Annotated[str, _checked(topic_name_problem)]
OptionalQueueName = Annotated[str | None, _EMPTY_IS_NONE, _checked(queue_name_problem)]
"""A queue name or nothing; an empty form field or an absent alert label ("None") is nothing."""
OptionalTopicName = Annotated[str | None, _EMPTY_IS_NONE, _checked(topic_name_problem)]

# --- attributes ---------------------------------------------------------------------------

# what CreateQueue / CreateTopic / Subscribe accept; the redrive policy is declared by
# dead_letter_queue + max_receive_count, and ARNs in it depend on the account
QUEUE_ATTRIBUTES = frozenset(
    {
        "DelaySeconds",
        "MaximumMessageSize",
        "MessageRetentionPeriod",
        "ReceiveMessageWaitTimeSeconds",
        "VisibilityTimeout",
        "KmsMasterKeyId",
        "KmsDataKeyReusePeriodSeconds",
        "SqsManagedSseEnabled",
        "FifoQueue",
        "ContentBasedDeduplication",
        "DeduplicationScope",
        "FifoThroughputLimit",
        "Policy",
        "RedriveAllowPolicy",
    }
)
TOPIC_ATTRIBUTES = frozenset(
    {
        "DisplayName",
        "Policy",
        "DeliveryPolicy",
        "KmsMasterKeyId",
        "SignatureVersion",
        "TracingConfig",
        "FifoTopic",
        "ContentBasedDeduplication",
    }
)
SUBSCRIPTION_ATTRIBUTES = frozenset(
    {"RawMessageDelivery", "FilterPolicy", "FilterPolicyScope", "RedrivePolicy", "DeliveryPolicy"}
)
# compared as JSON: AWS gives them back with its own spacing and key order
JSON_ATTRIBUTES = frozenset(
    {"Policy", "RedriveAllowPolicy", "DeliveryPolicy", "FilterPolicy", "RedrivePolicy"}
)
PROTOCOLS = frozenset(
    {
        "sqs",
        "sns",
        "lambda",
        "firehose",
        "http",
        "https",
        "email",
        "email-json",
        "sms",
        "application",
    }
)


def _attribute_text(values: Any) -> Any:
    # AWS attributes are strings; YAML says `VisibilityTimeout: 30`, `RawMessageDelivery: true`
    # or gives a policy as a mapping: taken as AWS spells them
    if not isinstance(values, dict):
        return values
    out = {}
    for k, v in values.items():
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, int | float):
            v = str(v)
        elif isinstance(v, dict | list):
            v = json.dumps(v, sort_keys=True)
        out[k] = v
    return out


def _allowed(names: frozenset[str], what: str) -> Any:
    def check(values: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k in values if k not in names)
        if bad:
            raise ValueError(
                f"not {what} attributes: {', '.join(repr(k[:60]) for k in bad)} "
                f"(known: {', '.join(sorted(names))})"
            )
        for k in values.keys() & JSON_ATTRIBUTES:
            try:
                json.loads(values[k])
            except ValueError:
                raise ValueError(f"{k} is not JSON") from None
        return values

    return AfterValidator(check)


def _attributes(names: frozenset[str], what: str) -> Any:
    return Annotated[dict[str, str], BeforeValidator(_attribute_text), _allowed(names, what)]


def same_value(key: str, live: str | None, want: str) -> bool:
    if live is None:
        return False
    if key in JSON_ATTRIBUTES:
        try:
            return json.loads(live) == json.loads(want)
        except ValueError:
            return False
    if want.lower() in ("true", "false"):  # AWS answers "true", a spec may say "True"
        return live.lower() == want.lower()
    return live == want


def attribute_drift(
    live: dict[str, str], want: dict[str, str]
) -> dict[str, tuple[str | None, str]]:
    """attribute -> (live value, spec value) for each declared attribute that differs."""
    return {
        k: (live.get(k), v) for k, v in sorted(want.items()) if not same_value(k, live.get(k), v)
    }


# --- specs -------------------------------------------------------------------------------


class QueueSpec(BaseModel):
    """An SQS queue as it should be."""

    name: QueueName = Field(description="Queue name (a .fifo name is a FIFO queue).")
    attributes: _attributes(QUEUE_ATTRIBUTES, "SQS queue") = Field(  # type: ignore[valid-type]
        default_factory=dict,
        description="Attributes that must hold, e.g. VisibilityTimeout, MessageRetentionPeriod; "
        "others are left alone.",
    )
    dead_letter_queue: OptionalQueueName = Field(
        None, description="Name of its dead-letter queue, declared in the same list."
    )
    max_receive_count: int = Field(
        5, ge=1, le=1000, description="Receives before a message moves to the dead-letter queue."
    )

    @model_validator(mode="after")
    def _fifo(self) -> Self:
        fifo = self.name.endswith(".fifo")
        if fifo:
            # CreateQueue makes a FIFO queue only when asked to
            self.attributes.setdefault("FifoQueue", "true")
        elif self.attributes.get("FifoQueue", "false") != "false":
            raise ValueError(f"{self.name}: a FIFO queue's name ends with .fifo")
        if self.dead_letter_queue == self.name:
            raise ValueError(f"{self.name} cannot be its own dead-letter queue")
        if self.dead_letter_queue and self.dead_letter_queue.endswith(".fifo") != fifo:
            raise ValueError(
                f"{self.name}: a queue and its dead-letter queue are both FIFO or neither"
            )
        return self


class SubscriptionSpec(BaseModel):
    """A subscription of a topic: where its messages go."""

    protocol: str = Field(description="sqs, lambda, http, https, email, sms, ...")
    endpoint: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^\S+$",
        description="Where messages go; for sqs a declared queue's name (its ARN follows from "
        "the account) or a queue ARN.",
    )
    attributes: _attributes(SUBSCRIPTION_ATTRIBUTES, "SNS subscription") = Field(  # type: ignore[valid-type]
        default_factory=dict, description="e.g. RawMessageDelivery, FilterPolicy."
    )

    @model_validator(mode="after")
    def _protocol(self) -> Self:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol[:30]!r} is not one of {sorted(PROTOCOLS)}")
        if self.protocol == "sqs" and not self.endpoint.startswith("arn:"):
            problem = queue_name_problem(self.endpoint)
            if problem:
                raise ValueError(f"sqs endpoint: {problem}")
        return self


class TopicSpec(BaseModel):
    """An SNS topic as it should be, with its subscriptions."""

    name: TopicName = Field(description="Topic name (a .fifo name is a FIFO topic).")
    attributes: _attributes(TOPIC_ATTRIBUTES, "SNS topic") = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Attributes that must hold, e.g. DisplayName."
    )
    subscriptions: list[SubscriptionSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fifo(self) -> Self:
        if self.name.endswith(".fifo"):
            self.attributes.setdefault("FifoTopic", "true")
        return self


class MetricSpec(BaseModel):
    """A CloudWatch metric an application should keep publishing."""

    namespace: str = Field(
        min_length=1, max_length=255, pattern=r"^[^:\s][^:]*$", description="e.g. EventProcessing."
    )
    name: str = Field(
        min_length=1, max_length=255, description="Metric name, e.g. EventThroughput."
    )
    dimensions: dict[str, str] = Field(
        default_factory=dict, max_length=30, description="The metric's exact dimensions."
    )
    max_age_s: int = Field(
        600, ge=60, le=86400, description="A metric with no datapoint this recent has stopped."
    )

    def describe(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in sorted(self.dimensions.items()))
        return f"{self.namespace}/{self.name}" + (f"{{{dims}}}" if dims else "")


def declared_dead_letter_queues(queues: list[QueueSpec]) -> list[QueueSpec]:
    """A list validator: every dead_letter_queue is declared too (its attributes are needed)."""
    names = {q.name for q in queues}
    undeclared = sorted({q.dead_letter_queue for q in queues if q.dead_letter_queue} - names)
    if undeclared:
        raise ValueError(f"dead-letter queues not declared: {', '.join(undeclared)}")
    return queues


# --- live state ----------------------------------------------------------------------------


class AwsLocation(BaseModel):
    """The account and region the resources are in: their ARNs follow from it."""

    account: str
    region: str
    partition: str = "aws"
    endpoint: str | None = None

    def queue_arn(self, name: str) -> str:
        return f"arn:{self.partition}:sqs:{self.region}:{self.account}:{name}"

    def topic_arn(self, name: str) -> str:
        return f"arn:{self.partition}:sns:{self.region}:{self.account}:{name}"

    def endpoint_arn(self, sub: SubscriptionSpec) -> str:
        if sub.protocol == "sqs" and not sub.endpoint.startswith("arn:"):
            return self.queue_arn(sub.endpoint)
        return sub.endpoint

    def describe(self) -> str:
        return f"account {self.account} in {self.region}" + (
            f" at {self.endpoint}" if self.endpoint else ""
        )


class QueueState(BaseModel):
    name: str
    exists: bool
    url: str | None = None
    attributes: dict[str, str] = Field(default_factory=dict)


class SubscriptionState(BaseModel):
    protocol: str
    endpoint: str
    arn: str = Field(description="'PendingConfirmation' until the endpoint's owner confirms.")
    attributes: dict[str, str] = Field(default_factory=dict)


class TopicState(BaseModel):
    name: str
    exists: bool
    attributes: dict[str, str] = Field(default_factory=dict)
    subscriptions: list[SubscriptionState] = Field(default_factory=list)


class AwsResources(BaseModel):
    """What the account has of the declared queues and topics."""

    location: AwsLocation
    queues: dict[str, QueueState]
    topics: dict[str, TopicState]


# --- decisions ------------------------------------------------------------------------------


class Status(StrEnum):
    OK = "ok"
    MISSING = "missing"
    DRIFTED = "drifted"


class Action(StrEnum):
    CREATE_QUEUE = "create_queue"
    SET_REDRIVE_POLICY = "set_redrive_policy"
    CREATE_TOPIC = "create_topic"
    SUBSCRIBE = "subscribe"


class Kind(StrEnum):
    QUEUE = "SQS queue"
    REDRIVE = "redrive policy"
    TOPIC = "SNS topic"
    SUBSCRIPTION = "SNS subscription"


_CREATES = {
    Kind.QUEUE: Action.CREATE_QUEUE,
    Kind.REDRIVE: Action.SET_REDRIVE_POLICY,
    Kind.TOPIC: Action.CREATE_TOPIC,
    Kind.SUBSCRIPTION: Action.SUBSCRIBE,
}


class ResourceDecision(BaseModel):
    """One declared resource: ok, missing (re-created) or drifted (reported)."""

    kind: Kind
    name: str = Field(description="queue or topic name; subscriptions: topic -> protocol:endpoint")
    status: Status
    drifted: dict[str, tuple[str | None, str]] = Field(
        default_factory=dict, description="attribute -> (live value, spec value)."
    )
    findings: list[str] = Field(default_factory=list)

    @property
    def action(self) -> Action | None:
        return _CREATES[self.kind] if self.status is Status.MISSING else None

    def describe(self) -> str:
        if self.status is Status.MISSING:
            return "missing"
        if self.status is Status.OK:
            return "as declared"
        parts = [f"{k} is {live!r}, spec {want!r}" for k, (live, want) in self.drifted.items()]
        return "; ".join(parts + self.findings)


def redrive_policy(location: AwsLocation, spec: QueueSpec) -> dict[str, Any]:
    assert spec.dead_letter_queue
    return {
        "deadLetterTargetArn": location.queue_arn(spec.dead_letter_queue),
        "maxReceiveCount": spec.max_receive_count,
    }


def _redrive_differs(live: str, want: dict[str, Any]) -> bool:
    try:
        policy = json.loads(live)
        return (policy.get("deadLetterTargetArn"), int(policy.get("maxReceiveCount", 0))) != (
            want["deadLetterTargetArn"],
            want["maxReceiveCount"],
        )
    except (ValueError, TypeError, AttributeError):
        return True


def decide_queue(
    spec: QueueSpec, state: QueueState, location: AwsLocation
) -> list[ResourceDecision]:
    """The queue, and its redrive policy when it has a dead-letter queue."""
    decisions = []
    if not state.exists:
        decisions.append(ResourceDecision(kind=Kind.QUEUE, name=spec.name, status=Status.MISSING))
    else:
        drift = attribute_drift(state.attributes, spec.attributes)
        decisions.append(
            ResourceDecision(
                kind=Kind.QUEUE,
                name=spec.name,
                status=Status.DRIFTED if drift else Status.OK,
                drifted=drift,
            )
        )
    if spec.dead_letter_queue:
        want = redrive_policy(location, spec)
        live = state.attributes.get("RedrivePolicy")
        label = f"{spec.name} -> {spec.dead_letter_queue}"
        if not state.exists or not live:
            status, drift = Status.MISSING, {}
        elif _redrive_differs(live, want):
            status, drift = Status.DRIFTED, {"RedrivePolicy": (live, json.dumps(want))}
        else:
            status, drift = Status.OK, {}
        decisions.append(
            ResourceDecision(kind=Kind.REDRIVE, name=label, status=status, drifted=drift)
        )
    return decisions


def subscription_label(topic: str, sub: SubscriptionSpec) -> str:
    return f"{topic} -> {sub.protocol}:{sub.endpoint}"


def decide_topic(
    spec: TopicSpec, state: TopicState, location: AwsLocation
) -> list[ResourceDecision]:
    """The topic, and each declared subscription."""
    if not state.exists:
        topic = ResourceDecision(kind=Kind.TOPIC, name=spec.name, status=Status.MISSING)
    else:
        drift = attribute_drift(state.attributes, spec.attributes)
        topic = ResourceDecision(
            kind=Kind.TOPIC,
            name=spec.name,
            status=Status.DRIFTED if drift else Status.OK,
            drifted=drift,
        )
    decisions = [topic]
    for sub in spec.subscriptions:
        label = subscription_label(spec.name, sub)
        endpoint = location.endpoint_arn(sub)
        live = [
            s for s in state.subscriptions if s.protocol == sub.protocol and s.endpoint == endpoint
        ]
        if not live:
            decisions.append(
                ResourceDecision(kind=Kind.SUBSCRIPTION, name=label, status=Status.MISSING)
            )
            continue
        findings = []
        if all(s.arn == "PendingConfirmation" for s in live):
            findings.append("pending confirmation: the endpoint's owner must confirm it")
            drift = {}
        else:
            confirmed = next(s for s in live if s.arn != "PendingConfirmation")
            drift = attribute_drift(confirmed.attributes, sub.attributes)
        decisions.append(
            ResourceDecision(
                kind=Kind.SUBSCRIPTION,
                name=label,
                status=Status.DRIFTED if drift or findings else Status.OK,
                drifted=drift,
                findings=findings,
            )
        )
    return decisions


def decide_all(
    queues: list[QueueSpec], topics: list[TopicSpec], live: AwsResources
) -> list[ResourceDecision]:
    out: list[ResourceDecision] = []
    for q in queues:
        out += decide_queue(q, live.queues[q.name], live.location)
    for t in topics:
        out += decide_topic(t, live.topics[t.name], live.location)
    return out


def plan_creations(
    decisions: list[ResourceDecision],
    queues: list[QueueSpec],
    topics: list[TopicSpec],
    location: AwsLocation,
    action: Action,
) -> list[Change]:
    """The creations of one kind the decisions call for, with what each is created with.

    Queues come in declaration order; redrive policies are separate changes made after every
    queue exists, so a dead-letter queue always exists before a policy names its ARN.
    """
    by_queue = {q.name: q for q in queues}
    by_topic = {t.name: t for t in topics}
    changes = []
    for d in decisions:
        if d.action is not action:
            continue
        if action is Action.CREATE_QUEUE:
            detail: dict[str, Any] = {"attributes": by_queue[d.name].attributes}
        elif action is Action.SET_REDRIVE_POLICY:
            spec = by_queue[d.name.split(" -> ")[0]]
            detail = {"queue": spec.name, "RedrivePolicy": redrive_policy(location, spec)}
        elif action is Action.CREATE_TOPIC:
            detail = {"attributes": by_topic[d.name].attributes}
        else:
            topic = d.name.partition(" -> ")[0]
            sub = next(
                s for s in by_topic[topic].subscriptions if subscription_label(topic, s) == d.name
            )
            detail = {
                "topic": topic,
                "protocol": sub.protocol,
                "endpoint": location.endpoint_arn(sub),
                "attributes": sub.attributes,
            }
        changes.append(Change(action=action.value, target=d.name, detail=detail))
    return changes


# --- CloudWatch metrics ------------------------------------------------------------------------


class MetricStatus(StrEnum):
    PUBLISHING = "publishing"
    STOPPED = "stopped"
    NEVER_SEEN = "never seen"


class MetricState(BaseModel):
    """What CloudWatch has of one metric over the spec's window."""

    metric: str
    listed: bool = Field(description="ListMetrics knows it (published in the last two weeks).")
    newest: datetime | None = Field(None, description="Start of the newest period with data.")
    datapoints: int = Field(0, description="Samples in the window.")


class MetricDecision(BaseModel):
    metric: str
    status: MetricStatus
    detail: str


def decide_metric(spec: MetricSpec, state: MetricState, now: datetime) -> MetricDecision:
    """Publishing: a datapoint within max_age_s; stopped: known to CloudWatch but silent;
    never seen: CloudWatch has not had it for two weeks (a wrong name, or never published)."""
    window = f"the last {spec.max_age_s}s"
    if state.newest is not None:
        age = (now - state.newest).total_seconds()
        # a period's datapoint is stamped with its start: up to a period (60 s) older than the sample
        if age <= spec.max_age_s + 60:
            return MetricDecision(
                metric=state.metric,
                status=MetricStatus.PUBLISHING,
                detail=f"{state.datapoints} sample(s) in {window}, newest in the minute from "
                f"{state.newest:%H:%M} UTC",
            )
    if state.listed:
        return MetricDecision(
            metric=state.metric,
            status=MetricStatus.STOPPED,
            detail=f"no datapoint in {window}; CloudWatch lists the metric, so it published before",
        )
    return MetricDecision(
        metric=state.metric,
        status=MetricStatus.NEVER_SEEN,
        detail=f"no datapoint in {window}, and CloudWatch does not list it (nothing published in "
        "two weeks, or namespace, name or dimensions differ)",
    )


# --- LocalStack health --------------------------------------------------------------------------

HEALTHY_SERVICE_STATES = frozenset({"running", "available"})
NEEDED_SERVICES = ("sqs", "sns", "cloudwatch")


def health_problems(health: dict[str, Any], needed: tuple[str, ...] = NEEDED_SERVICES) -> list[str]:
    """Problems in LocalStack's /_localstack/health answer ({"services": {"sqs": "running", ...}})
    for the services the runbook needs; "available" is a service LocalStack starts on first use."""
    services = health.get("services")
    if not isinstance(services, dict):
        return ["the answer has no 'services' map"]
    problems = []
    for name in needed:
        state = services.get(name)
        if state is None:
            problems.append(f"{name} is not offered")
        elif state not in HEALTHY_SERVICE_STATES:
            problems.append(f"{name} is {state}")
    return problems
