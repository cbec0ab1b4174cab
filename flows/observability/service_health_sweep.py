"""Runbook ``service-health-sweep`` (seed 002 "Initial Response (OODA Loop)", seed 001 "Triage"):
observe every service's health endpoint and, when ``platform`` says where the services run,
their instances there (seed 002 "Check container status": running, crash-looping, stopped, not
found), orient with each service's error rate and p99 latency from Prometheus and the alerts
firing in Alertmanager, decide which situation this is
(tasks/sweep_decisions.py: all down, some down, circuit breaker open, error spike, high latency,
healthy) and hand it to the runbook that acts on it:

- a service down -> ``service-not-responding`` for it (when ``platform`` says where services run);
- a breaker open -> ``circuit-breaker-open`` with the service's actuator;
- an error spike -> ``rollback-bad-deploy`` for the service (when ``platform`` is given);
- everything down, high latency, or no runbook to hand to -> escalated with the evidence.

It changes nothing itself: the runbooks it hands to run as their own runs, under their own locks,
budgets and approvals, in dry-run when this run is. Prometheus and Alertmanager are optional; one
that is configured and does not answer is said so, and the sweep goes on with what it saw; so
is a platform that cannot be read (its block not saved, its API down): health still decides.
"""

from typing import Annotated

from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import AfterValidator, BaseModel, Field

from blocks.prometheus import AlertmanagerServer, PrometheusServer
from flows.services.common import describe_instance
from runbooks.errors import Escalation
from runbooks.handoff import hand_off
from runbooks.params import (
    OptionalBlockName,
    OptionalNamespace,
    OptionalPlatformRef,
    RunbookParams,
)
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.severity import severity_level
from runbooks.text import artifact_key
from tasks.alertmanager import AlertmanagerUnavailable, FiringAlert, firing_alerts
from tasks.health_endpoints import HealthEndpoint, ServiceHealth, probe_endpoints
from tasks.prometheus import PrometheusUnavailable, PromQLError, label_matcher, query_prometheus
from tasks.slo_decisions import PromDuration, WindowedQuery
from tasks.sweep_decisions import (
    Decision,
    Instances,
    ServiceSignals,
    Situation,
    Thresholds,
    actuator_base,
    decide,
    handoff_blocked,
    instances_verdict,
    open_breakers,
    problems_of,
    show_latency,
    show_rate,
    values_by_service,
)
from tasks.workloads import WorkloadRef, load_backend, workload_status

RUNBOOK = "service-health-sweep"

# seed 002 "Orient": the platform's request metrics, one value per service
ERROR_RATE_QUERY = (
    'sum by (service) (rate(http_requests_total{status=~"5.."}[{window}])) '
    "/ sum by (service) (rate(http_requests_total[{window}]))"
)
LATENCY_QUERY = (
    "histogram_quantile(0.99, sum by (service, le) "
    "(rate(http_request_duration_seconds_bucket[{window}])))"
)

# seed 003 "System Health": the platform's Spring Boot services on 8081-8084 (prefect.yaml lists
# them too, as the example to replace with yours)
SEED_ENDPOINTS = tuple(
    HealthEndpoint(service=name, url=f"http://localhost:{port}/actuator/health", style="actuator")
    for name, port in (
        ("event-producer", 8081),
        ("event-processor", 8082),
        ("event-store", 8083),
        ("event-notifier", 8084),
    )
)


def _one_per_service(endpoints: list[HealthEndpoint]) -> list[HealthEndpoint]:
    names = [e.service for e in endpoints]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"one endpoint per service; listed more than once: {', '.join(twice)}")
    return endpoints


def _label_name(value: str) -> str:
    label_matcher(value, "")  # raises for anything that is not a Prometheus label name
    return value


class ServiceHealthSweepParams(RunbookParams):
    """Run form of the service-health-sweep runbook."""

    endpoints: Annotated[list[HealthEndpoint], AfterValidator(_one_per_service)] = Field(
        default_factory=lambda: list(SEED_ENDPOINTS),
        min_length=1,
        description="Every service's health endpoint (plain, actuator or go style). The service "
        "name is how Prometheus's `service` label, the alerts and the platform name it.",
    )
    prometheus_block: OptionalBlockName = Field(
        None,
        description="'Runbooks Prometheus Server' block for error rates and latency; empty: "
        "health endpoints and alerts only.",
    )
    error_rate_query: WindowedQuery = Field(
        ERROR_RATE_QUERY,
        description="PromQL giving each service's share of 5xx answers over {window}, one "
        "series per service (`by (service)`).",
    )
    latency_query: WindowedQuery = Field(
        LATENCY_QUERY,
        description="PromQL giving each service's p99 latency in seconds over {window}, one "
        "series per service.",
    )
    service_label: Annotated[str, AfterValidator(_label_name)] = Field(
        "service",
        description="The label that names the service in the queries' results and in alerts.",
    )
    window: PromDuration = Field("5m", description="The window rates are measured over.")
    error_rate_threshold: float = Field(
        0.05, gt=0, le=1, description="A 5xx share over this is an error spike (seed 003: 5%)."
    )
    p99_threshold_s: float = Field(
        2.0, gt=0, le=600, description="A p99 over this is high latency (seed 003: 2000 ms)."
    )
    alertmanager_block: OptionalBlockName = Field(
        None, description="'Runbooks Alertmanager' block for firing alerts; empty: none read."
    )
    alert_matchers: dict[str, str] = Field(
        default_factory=dict,
        description="Only alerts with these label values (e.g. environment=prod); empty: all.",
    )
    platform: OptionalPlatformRef = Field(
        None,
        description="Where the services run (kubernetes/<block>, docker/<block> or "
        "supervisord/<block>): each service's instances are read there and shown beside its "
        "health; a down service is handed to service-not-responding, an error spike to "
        "rollback-bad-deploy. Empty: instances not read, those are escalated instead.",
    )
    namespace: OptionalNamespace = Field(
        None,
        description="Kubernetes namespace of the services, for the hand-offs; empty: the block's.",
    )


class SweepSummary(BaseModel):
    outcome: Outcome
    decision: Decision
    services: list[ServiceSignals]
    handed_off: dict[str, str] = Field(default_factory=dict, description="Service -> run link.")
    report: str = Field(description="The report, as markdown.")


@flow(
    name=RUNBOOK,
    description="Every service's health endpoint, error rate and p99 from Prometheus and firing "
    "alerts; decides all down / one down / breaker open / error spike / high latency and hands "
    "it to the runbook that fixes it, or escalates. Changes nothing itself.",
)
@ends_as_reported
def service_health_sweep(params: ServiceHealthSweepParams) -> SweepSummary:
    with incident_report(
        runbook=RUNBOOK, title="Service Health Sweep", severity="P3", params=params
    ) as report:
        healths = probe_endpoints(params.endpoints)
        for h in healths:
            report.check(f"{h.service} health", h.up and not open_breakers(h), h.describe())
        report.evidence("health endpoints", [h.model_dump(mode="json") for h in healths])
        instances = _instances(report, params)
        errors, latencies = _metrics(report, params)
        alerts, unmatched = _alerts(report, params)
        thresholds = Thresholds(
            error_rate=params.error_rate_threshold, p99_s=params.p99_threshold_s
        )
        signals = [
            ServiceSignals(
                service=h.service,
                url=h.url,
                up=h.up,
                health=h.describe(),
                open_breakers=open_breakers(h),
                error_rate=errors.get(h.service),
                p99_s=latencies.get(h.service),
                alerts=[a.describe() for a in alerts.get(h.service, [])],
                instances=instances.get(h.service, (None, None))[0],
                instances_seen=instances.get(h.service, (None, None))[1],
            )
            for h in healths
        ]
        _record_metrics(report, signals, thresholds, measured=bool(params.prometheus_block))
        decision = decide(signals, thresholds)
        _publish_table(signals, decision)
        report.evidence("decision", decision)
        report.step(f"decision: {decision.describe()}")
        _raise_severity(report, decision)
        report.follow_ups += [f"Also seen, look after this: {line}." for line in decision.also]
        if unmatched:
            report.follow_ups.append(
                f"{len(unmatched)} firing alert(s) name no swept service: "
                + "; ".join(a.describe() for a in unmatched[:10])
            )
        handed = _respond(report, params, decision, signals, {h.service: h for h in healths})
        return SweepSummary(
            outcome=report.outcome,
            decision=decision,
            services=signals,
            handed_off=handed,
            report=report.to_markdown(),
        )


def _instances(
    report: IncidentReport, params: ServiceHealthSweepParams
) -> dict[str, tuple[Instances, str]]:
    """Seed 002 "Check container status": each service's instances where it runs, as service ->
    (verdict, in words); empty without a platform. A platform that cannot be read is said, and
    the services not read yet are marked so."""
    if not params.platform:
        report.step("no platform given: the services' instances not read")
        return {}
    names = [e.service for e in params.endpoints]
    try:
        backend = load_backend(params.platform)
    except ValueError as exc:  # Block.load: no block document of that name
        return _unread(report, params, names, f"its block is not saved ({exc})")
    seen: dict[str, tuple[Instances, str]] = {}
    for name in names:
        try:
            status = workload_status(backend, WorkloadRef(name=name, namespace=params.namespace))
        except Exception as exc:  # noqa: BLE001 - an unreadable platform is a finding; the sweep goes on
            left = [n for n in names if n not in seen]
            return seen | _unread(report, params, left, f"{type(exc).__name__}: {exc}"[:300])
        verdict = instances_verdict(status)
        if verdict is Instances.NOT_FOUND:
            words = f"{params.platform} does not know {name}"
        else:
            shown = "; ".join(map(describe_instance, status.instances))
            words = f"{verdict.value} on {params.platform}: {shown}"
        report.check(f"{name} instances", verdict is Instances.RUNNING, words)
        report.evidence(f"{name} on {params.platform}", status)
        seen[name] = (verdict, words)
    return seen


def _unread(
    report: IncidentReport, params: ServiceHealthSweepParams, names: list[str], why: str
) -> dict[str, tuple[Instances, str]]:
    report.check("platform", False, f"{params.platform} not read: {why}")
    report.follow_ups.append(
        f"Make the platform {params.platform} readable: this sweep saw no instances of "
        f"{', '.join(names)}."
    )
    return {n: (Instances.UNREAD, f"instances not read ({params.platform})") for n in names}


def _metrics(
    report: IncidentReport, params: ServiceHealthSweepParams
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Each service's error rate and p99; empty when Prometheus is not configured or not there."""
    if not params.prometheus_block:
        report.step("no Prometheus block given: error rates and latency not measured")
        return {}, {}
    server = PrometheusServer.load(params.prometheus_block)
    found: list[dict[str, float | None]] = []
    for what, query in (
        ("error rate", params.error_rate_query),
        ("p99 latency", params.latency_query),
    ):
        expr = query.replace("{window}", params.window)
        try:
            samples = query_prometheus(server, expr)
        except PrometheusUnavailable as exc:
            report.check("Prometheus", False, f"does not answer ({exc}): no metrics this sweep")
            report.follow_ups.append(
                f"Make Prometheus at {server.url} reachable: this sweep saw no error rates or latency."
            )
            return {}, {}
        except PromQLError as exc:
            report.check(f"{what} query", False, f"refused: {exc}")
            report.follow_ups.append(f"Fix the {what} query ({expr}): Prometheus refused it.")
            found.append({})
            continue
        values = values_by_service(samples, params.service_label)
        swept = {e.service: values[e.service] for e in params.endpoints if e.service in values}
        report.evidence(
            f"{what} query",
            {"query": expr, "swept services": swept, "other series": len(samples) - len(swept)},
        )
        found.append(swept)
    return found[0], found[1]


def _alerts(
    report: IncidentReport, params: ServiceHealthSweepParams
) -> tuple[dict[str, list[FiringAlert]], list[FiringAlert]]:
    """Firing alerts by the service they name, and those naming none of the swept services."""
    if not params.alertmanager_block:
        report.step("no Alertmanager block given: firing alerts not read")
        return {}, []
    server = AlertmanagerServer.load(params.alertmanager_block)
    try:
        alerts = firing_alerts(server, params.alert_matchers)
    except AlertmanagerUnavailable as exc:
        report.check("Alertmanager", False, f"does not answer ({exc}): firing alerts not read")
        report.follow_ups.append(f"Make Alertmanager at {server.url} reachable.")
        return {}, []
    swept = {e.service for e in params.endpoints}
    by_service: dict[str, list[FiringAlert]] = {}
    unmatched = []
    for alert in alerts:
        service = alert.labels.get(params.service_label)
        if service in swept:
            by_service.setdefault(service, []).append(alert)
        else:
            unmatched.append(alert)
    report.check(
        "firing alerts",
        not alerts,
        "; ".join(a.describe() for a in alerts[:20]) or "none",
    )
    report.evidence("firing alerts", [a.model_dump(mode="json") for a in alerts])
    return by_service, unmatched


def _record_metrics(
    report: IncidentReport, signals: list[ServiceSignals], t: Thresholds, *, measured: bool
) -> None:
    if not measured:
        return
    blind = [s.service for s in signals if s.up and (s.error_rate is None or s.p99_s is None)]
    if blind:
        report.follow_ups.append(
            f"No error rate or p99 for {', '.join(blind)}: check that their request metrics are "
            "scraped and carry the service label the queries group by."
        )
    for s in signals:
        if not s.up:
            continue
        report.check(
            f"{s.service} errors and latency",
            not problems_of(s, t),
            f"5xx {show_rate(s.error_rate)} (threshold {show_rate(t.error_rate)}), "
            f"p99 {show_latency(s.p99_s)} (threshold {show_latency(t.p99_s)})",
        )


def _publish_table(signals: list[ServiceSignals], decision: Decision) -> None:
    create_table_artifact(
        table=[
            {
                "Service": s.service,
                "Health": "up" if s.up else "DOWN",
                "Instances": s.instances.value if s.instances else "-",
                "Open breakers": ", ".join(s.open_breakers) or "-",
                "Error rate": show_rate(s.error_rate),
                "p99": show_latency(s.p99_s),
                "Firing alerts": "; ".join(s.alerts) or "-",
                "Problems": ", ".join(p.value for p in decision.problems[s.service]) or "none",
            }
            for s in signals
        ],
        key=artifact_key("service-health-sweep"),
        description=f"Service health sweep: {decision.describe()}",
    )


def _raise_severity(report: IncidentReport, decision: Decision) -> None:
    """The situation's severity (seed 002) when it is more urgent than the run's."""
    level = severity_level(decision.severity)
    if level and report.severity_level and level.rank < report.severity_level.rank:
        report.severity_level, report.severity = level, level.name
        report.severity_why = f"raised to the situation's: {decision.situation.value}"


def _respond(
    report: IncidentReport,
    params: ServiceHealthSweepParams,
    decision: Decision,
    signals: list[ServiceSignals],
    healths: dict[str, ServiceHealth],
) -> dict[str, str]:
    """Hand the situation to its runbook, or escalate it; returns service -> hand-off link."""
    by_name = {s.service: s for s in signals}
    named = "; ".join(_evidence(by_name[n]) for n in decision.services)
    situation = decision.situation
    if situation is Situation.HEALTHY:
        alerting = [s for s in signals if s.alerts]
        measured = any(s.error_rate is not None or s.p99_s is not None for s in signals)
        report.finish(
            Outcome.NO_ACTION_NEEDED,
            f"All {len(signals)} service(s) are up, no breaker open, "
            + (
                "errors and latency within their thresholds"
                if measured
                else "errors and latency not measured"
            )
            + (
                f"; alerts still firing for {', '.join(s.service for s in alerting)}"
                if alerting
                else ""
            )
            + ".",
        )
        return {}
    if situation is Situation.ALL_DOWN:
        report.follow_ups.append(
            "Check the infrastructure all services share: the container engine or cluster "
            "(docker-compose ps, nodes), the network between them, DNS, the load balancer."
        )
        raise Escalation(
            f"All {len(signals)} services are down ({named}): a complete outage; "
            f"{decision.advice}. No service was restarted: they fail together, so the cause is "
            "what they share"
        )
    handed: dict[str, str] = {}
    blocked: dict[str, str] = {}
    for name in decision.services:
        runbook, handoff_params = _handoff_for(situation, params, healths[name], by_name[name])
        if runbook is None:
            continue
        why = handoff_blocked(by_name[name]) if "platform" in handoff_params else None
        if why:
            blocked[name] = why
            continue
        link = hand_off(runbook, params, handoff_params)
        kind = situation.value.lower() + _instances_word(by_name[name])
        report.step(f"{name} ({kind}): handed to {runbook}, {link}")
        handed[name] = link
    left = [n for n in decision.services if n not in handed]
    for name in left:
        report.follow_ups.append(f"{name}: {decision.advice}.")
    if left:
        why = {
            Situation.SOME_DOWN: "no platform given to hand them to service-not-responding",
            Situation.CIRCUIT_OPEN: "no actuator base URL derivable from their health endpoint",
            Situation.ERROR_SPIKE: "no platform given to hand them to rollback-bad-deploy",
            Situation.HIGH_LATENCY: "no runbook acts on latency by itself",
        }[situation]
        if blocked:
            why = "; ".join(dict.fromkeys(blocked.values()))
        raise Escalation(
            f"{situation.value}: {'; '.join(_evidence(by_name[n]) for n in left)}. "
            f"Recommended: {decision.advice} ({why})"
            + (f". Handed off: {', '.join(handed)}" if handed else "")
        )
    report.finish(
        Outcome.HANDED_OFF,
        f"{situation.value}: {named}. "
        + " ".join(f"{n} handed to its runbook ({link})." for n, link in handed.items())
        + " This run changed nothing; the runbooks handed to act under their own guards.",
    )
    return handed


def _evidence(s: ServiceSignals) -> str:
    """One service's health and, where measured, its error rate and p99, in words."""
    measured = [
        f"{what} {shown}"
        for what, value, shown in (
            ("5xx", s.error_rate, show_rate(s.error_rate)),
            ("p99", s.p99_s, show_latency(s.p99_s)),
        )
        if value is not None
    ]
    alerts = [f"alerts firing: {'; '.join(s.alerts)}"] if s.alerts else []
    instances = [f"instances: {s.instances_seen}"] if s.instances_seen else []
    return ", ".join([s.health, *instances, *measured, *alerts])


def _instances_word(s: ServiceSignals) -> str:
    """What the platform adds to a hand-off's name for the service's state, e.g. ", crash-looping"."""
    if s.instances in (Instances.CRASH_LOOPING, Instances.NONE_RUNNING, Instances.PARTLY):
        return f", {s.instances.value}"
    return ""


def _handoff_for(
    situation: Situation,
    params: ServiceHealthSweepParams,
    health: ServiceHealth,
    signals: ServiceSignals,
) -> tuple[str | None, dict]:
    """The runbook that acts on ``situation`` for one service and its parameters; None: none can."""
    if situation is Situation.CIRCUIT_OPEN:
        actuator = actuator_base(health.url)
        if actuator is None:
            return None, {}
        breaker = signals.open_breakers[0] if len(signals.open_breakers) == 1 else None
        return "circuit-breaker-open", {"actuator_url": actuator, "breaker": breaker}
    runbook = {
        Situation.SOME_DOWN: "service-not-responding",
        Situation.ERROR_SPIKE: "rollback-bad-deploy",
    }.get(situation)
    if runbook is None or not params.platform:
        return None, {}
    return runbook, {
        "platform": params.platform,
        "service": health.service,
        "namespace": params.namespace,
        "health_url": health.url,
    }
