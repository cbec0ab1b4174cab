"""Decisions of the service runbooks (issue #12): cases as data tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from flows.services.consumers_too_slow import (
    ConsumersTooSlowParams,
    ScaleAction,
    drain_seconds,
    plan_consumer_scale,
)
from flows.services.rollback_bad_deploy import RollbackAction, plan_rollback
from flows.services.rollback_bad_deploy import symptom as rollback_symptom
from flows.services.service_high_memory import Relief, plan_memory_relief
from flows.services.service_not_responding import ServiceNotRespondingParams, Verdict, diagnose
from flows.services.service_oom import (
    OomAction,
    OomPolicy,
    new_oom_kills,
    next_limit,
    oom_events,
    plan_oom_fix,
)
from runbooks.params import platform_ref_problem, service_name_problem
from runbooks.quantities import MIB, format_memory, parse_memory
from tasks.http_probe import HealthProbe, health_verdict, pprof_in_use
from tasks.kafka_lag import GroupLag, PartitionLag
from tasks.workloads import (
    Autoscaler,
    Capability,
    Instance,
    Revision,
    WorkloadEvent,
    WorkloadStatus,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
ALL = list(Capability)


def inst(name: str = "web-1", **kw: object) -> Instance:
    base: dict[str, object] = {"id": name, "name": name, "state": "running", "running": True}
    base.update(kw)
    return Instance.model_validate(base)


def status(*instances: Instance, **kw: object) -> WorkloadStatus:
    base: dict[str, object] = {
        "platform": "docker",
        "service": "web",
        "exists": True,
        "instances": list(instances),
        "capabilities": ALL,
    }
    base.update(kw)
    return WorkloadStatus.model_validate(base)


def probe(ok: bool) -> HealthProbe:
    return HealthProbe(
        url="http://h/health",
        ok=ok,
        status=200 if ok else None,
        latency_ms=3,
        error=None if ok else "ConnectTimeout",
    )


STOPPED = inst(state="exited", running=False, exit_code=1)
OOM = inst(state="exited", running=False, exit_code=137, oom_killed=True, finished_at=T0)
UNREADY = inst(ready=False)

DIAGNOSES = [
    ("all running, probe answers", status(inst()), probe(True), Verdict.HEALTHY),
    ("all running, no probe", status(inst()), None, Verdict.HEALTHY),
    ("running but endpoint silent (hung)", status(inst()), probe(False), Verdict.RESTART),
    ("one exited", status(inst(), STOPPED), probe(True), Verdict.RESTART),
    ("not ready, no probe", status(UNREADY), None, Verdict.RESTART),
    ("killed for memory", status(OOM), probe(False), Verdict.OOM),
    ("old OOM but answering now", status(inst(oom_killed=True)), probe(True), Verdict.HEALTHY),
    ("unknown service", status(exists=False), None, Verdict.MISSING),
    ("scaled to zero", status(desired_replicas=0), probe(False), Verdict.NO_INSTANCES),
    ("no containers at all", status(), None, Verdict.NO_INSTANCES),
]


@pytest.mark.parametrize(
    ("case", "seen", "health", "verdict"), DIAGNOSES, ids=[d[0] for d in DIAGNOSES]
)
def test_diagnose(
    case: str, seen: WorkloadStatus, health: HealthProbe | None, verdict: Verdict
) -> None:
    assert diagnose(seen, health).verdict is verdict


GI = 1024 * MIB
POLICY = OomPolicy(memory_factor=1.5, memory_cap=2 * GI)

OOM_PLANS = [
    (
        "raise by factor",
        status(OOM, memory_limit_bytes=512 * MIB),
        POLICY,
        OomAction.RAISE_LIMIT,
        768 * MIB,
    ),
    (
        "raise stops at the cap",
        status(OOM, memory_limit_bytes=1800 * MIB),
        POLICY,
        OomAction.RAISE_LIMIT,
        2 * GI,
    ),
    ("at the cap", status(OOM, memory_limit_bytes=2 * GI), POLICY, OomAction.ESCALATE, None),
    ("no limit: host OOM", status(OOM, memory_limit_bytes=None), POLICY, OomAction.ESCALATE, None),
    (
        "platform without limits",
        status(
            OOM, memory_limit_bytes=None, platform="supervisord", capabilities=[Capability.SCALE]
        ),
        POLICY,
        OomAction.ESCALATE,
        None,
    ),
    (
        "scale preferred and possible",
        status(OOM, inst("web-2"), desired_replicas=2, memory_limit_bytes=512 * MIB),
        OomPolicy(prefer_scale=True, max_replicas=3),
        OomAction.SCALE,
        None,
    ),
    (
        "scale preferred, at max: raise instead",
        status(OOM, inst("web-2"), desired_replicas=3, memory_limit_bytes=512 * MIB),
        OomPolicy(prefer_scale=True, max_replicas=3),
        OomAction.RAISE_LIMIT,
        768 * MIB,
    ),
]


@pytest.mark.parametrize(
    ("case", "seen", "policy", "action", "new_limit"), OOM_PLANS, ids=[p[0] for p in OOM_PLANS]
)
def test_plan_oom_fix(
    case: str, seen: WorkloadStatus, policy: OomPolicy, action: OomAction, new_limit: int | None
) -> None:
    plan = plan_oom_fix(seen, policy)
    assert plan.action is action, plan.reason
    assert plan.new_limit_bytes == new_limit


@pytest.mark.parametrize(
    ("current", "factor", "cap", "expected"),
    [
        (512 * MIB, 1.5, 4 * GI, 768 * MIB),
        (100 * MIB + 1, 1.0001, 4 * GI, 101 * MIB),  # rounded up to a whole MiB
        (3 * GI, 2, 4 * GI, 4 * GI),
    ],
)
def test_next_limit(current: int, factor: float, cap: int, expected: int) -> None:
    assert next_limit(current, factor, cap) == expected


@pytest.mark.parametrize(
    ("finished_at", "new"),
    [(T0 - timedelta(seconds=1), []), (T0 + timedelta(seconds=1), ["web-1"]), (None, ["web-1"])],
)
def test_new_oom_kills_counts_only_after_the_change(
    finished_at: datetime | None, new: list[str]
) -> None:
    seen = status(inst(oom_killed=True, finished_at=finished_at))
    assert new_oom_kills(seen, T0) == new


def test_oom_events_by_platform_word() -> None:
    events = [
        WorkloadEvent(at=T0, reason=reason)
        for reason in ("oom", "OOMKilling", "OOMKilled", "die", "BackOff", "restart")
    ]
    assert [e.reason for e in oom_events(events)] == ["oom", "OOMKilling", "OOMKilled"]


def lag(total: int, members: int | None = 1, partitions: int = 4) -> GroupLag:
    """A group ``total`` behind over ``partitions`` partitions (the rest on partition 0)."""
    each = [total // partitions] * partitions
    each[0] += total - sum(each)
    rows = [
        PartitionLag(topic="t", partition=p, committed=100, end_offset=100 + n, lag=n)
        for p, n in enumerate(each)
    ]
    return GroupLag(group="g", state="STABLE", members=members, partitions=rows)


def consumers(n: int, **kw: object) -> WorkloadStatus:
    return status(*(inst(f"c-{i}") for i in range(n)), desired_replicas=n, **kw)


PARAMS = ConsumersTooSlowParams(
    service="consumer",
    group="g",
    lag_threshold=1000,
    sample_interval_s=10,
    max_drain_s=60,
    max_replicas=6,
)
HPA = Autoscaler(name="consumer", min_replicas=1, max_replicas=8)

# (case, first sample, last sample, workload, action, target, partitions of the group's topics)
SCALE_PLANS = [
    ("caught up", lag(500), lag(900), consumers(1), ScaleAction.NONE, None, None),
    ("falling fast enough", lag(9000), lag(2000), consumers(1), ScaleAction.NONE, None, None),
    ("falling too slowly", lag(9000), lag(8900), consumers(1), ScaleAction.SCALE, 2, None),
    ("growing: double", lag(5000), lag(9000, members=2), consumers(2), ScaleAction.SCALE, 4, None),
    (
        "doubling capped by partitions",
        lag(5000, partitions=3),
        lag(9000, members=2, partitions=3),
        consumers(2),
        ScaleAction.SCALE,
        3,
        None,
    ),
    (
        "the group committed on 2 of the topic's 4 partitions yet: the topic decides",
        lag(5000, partitions=2),
        lag(9000, members=None, partitions=2),
        consumers(2),
        ScaleAction.SCALE,
        4,
        4,
    ),
    (
        "a consumer per partition",
        lag(5000),
        lag(9000, members=4),
        consumers(4),
        ScaleAction.AT_PARTITIONS,
        None,
        4,
    ),
    (
        "members unlisted: instances count",
        lag(5000),
        lag(9000, members=None),
        consumers(4),
        ScaleAction.AT_PARTITIONS,
        None,
        None,
    ),
    (
        "nobody consumes",
        lag(5000),
        lag(9000, members=0),
        consumers(0),
        ScaleAction.NO_CONSUMERS,
        None,
        None,
    ),
    (
        "at the replica cap",
        lag(5000, partitions=12),
        lag(9000, members=6, partitions=12),
        consumers(6),
        ScaleAction.AT_CAP,
        None,
        None,
    ),
    (
        "autoscaler manages replicas",
        lag(5000),
        lag(9000, members=2),
        consumers(2, autoscaler=HPA),
        ScaleAction.RAISE_AUTOSCALER_MIN,
        4,
        None,
    ),
    (
        "platform cannot scale",
        lag(5000),
        lag(9000),
        consumers(1, capabilities=[]),
        ScaleAction.CANNOT_SCALE,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("case", "first", "last", "seen", "action", "target", "topic_partitions"),
    SCALE_PLANS,
    ids=[p[0] for p in SCALE_PLANS],
)
def test_plan_consumer_scale(
    case: str,
    first: GroupLag,
    last: GroupLag,
    seen: WorkloadStatus,
    action: ScaleAction,
    target: int | None,
    topic_partitions: int | None,
) -> None:
    plan = plan_consumer_scale(first, last, seen, PARAMS, topic_partitions)
    assert plan.action is action, plan.reason
    assert plan.target == target


@pytest.mark.parametrize(
    ("lag_now", "change", "interval", "threshold", "expected"),
    [(10_000, 0, 10, 1000, None), (10_000, 500, 10, 1000, None), (10_000, -1000, 10, 1000, 90.0)],
)
def test_drain_seconds(
    lag_now: int, change: int, interval: float, threshold: int, expected: float | None
) -> None:
    assert drain_seconds(lag_now, change, interval, threshold) == expected


@pytest.mark.parametrize(
    ("text", "size", "shown"),
    [
        ("512Mi", 512 * MIB, "512Mi"),
        ("2Gi", 2 * GI, "2Gi"),
        ("1.5Gi", 3 * GI // 2, "1.5Gi"),
        ("64m", 64 * MIB, "64Mi"),  # Docker's m is MiB
        ("1G", 10**9, "953.7Mi"),
        ("4096", 4096, "4Ki"),
        (268435456, 256 * MIB, "256Mi"),
    ],
)
def test_memory_sizes(text: str | int, size: int, shown: str) -> None:
    assert parse_memory(text) == size
    assert format_memory(size) == shown


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-5", "1e9", "5Mi; rm -rf /"])
def test_memory_size_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory(text)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("docker/default", True),
        ("kubernetes/prod-eu", True),
        ("supervisord/edge-1", True),
        ("docker", False),
        ("nomad/x", False),
        ("docker/../secret", False),
        ("docker/Prod", False),
        ("docker/", False),
    ],
)
def test_platform_ref(value: str, ok: bool) -> None:
    assert (platform_ref_problem(value) is None) is ok


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("orders-api", True),
        ("consumers:consumer_00", True),
        ("stream_processor.py", True),
        ("../etc", False),
        ("a b", False),
        ("$(reboot)", False),
        ("-rf", False),
        ("x" * 254, False),
    ],
)
def test_service_name(name: str, ok: bool) -> None:
    assert (service_name_problem(name) is None) is ok


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:8080/health", True),
        ("https://api.example/ready", True),
        ("file:///etc/passwd", False),
        ("gopher://x", False),
        ("http://user:pw@host/health", False),
    ],
)
def test_health_url(url: str, ok: bool) -> None:
    if ok:
        ServiceNotRespondingParams(service="web", health_url=url)
        return
    with pytest.raises(ValidationError) as error:
        ServiceNotRespondingParams(service="web", health_url=url)
    assert "pw" not in str(error.value) or "credentials" in str(error.value)


@pytest.mark.parametrize(
    ("code", "error", "ok"),
    [
        (200, None, True),
        (204, None, True),
        (301, None, False),
        (503, None, False),
        (None, "timeout", False),
    ],
)
def test_health_verdict(code: int | None, error: str | None, ok: bool) -> None:
    assert health_verdict(code, error) is ok


# --- rollback-bad-deploy ---------------------------------------------------------------------

NOW = T0 + timedelta(hours=2)


def rev(n: int, minutes_ago: float, current: bool = False) -> Revision:
    return Revision(
        revision=n,
        created_at=NOW - timedelta(minutes=minutes_ago),
        images=[f"app:{n}"],
        current=current,
    )


ROLLBACKS = [
    ("healthy", status(inst()), [rev(1, 300), rev(2, 10, True)], None, RollbackAction.NONE, None),
    (
        "failing after a recent rollout",
        status(inst()),
        [rev(1, 300), rev(2, 10, True)],
        "HTTP 503",
        RollbackAction.ROLLBACK,
        1,
    ),
    (
        "back to the newest earlier revision",
        status(inst()),
        [rev(1, 900), rev(3, 300), rev(4, 5, True)],
        "HTTP 503",
        RollbackAction.ROLLBACK,
        3,
    ),
    (
        "rollout too old to blame",
        status(inst()),
        [rev(1, 900), rev(2, 120, True)],
        "HTTP 503",
        RollbackAction.NOT_RECENT,
        None,
    ),
    (
        "first revision",
        status(inst()),
        [rev(1, 5, True)],
        "HTTP 503",
        RollbackAction.NO_PREVIOUS,
        None,
    ),
    (
        "docker keeps no history",
        status(inst(), capabilities=[Capability.MEMORY_LIMIT]),
        [],
        "HTTP 503",
        RollbackAction.NO_HISTORY,
        None,
    ),
]


@pytest.mark.parametrize(
    ("case", "seen", "history", "failing", "action", "to"), ROLLBACKS, ids=[r[0] for r in ROLLBACKS]
)
def test_plan_rollback(
    case: str,
    seen: WorkloadStatus,
    history: list[Revision],
    failing: str | None,
    action: RollbackAction,
    to: int | None,
) -> None:
    plan = plan_rollback(seen, history, failing, NOW, window_s=3600)
    assert plan.action is action, plan.reason
    assert plan.to_revision == to


@pytest.mark.parametrize(
    ("seen", "health", "alert", "unwell"),
    [
        (status(inst()), probe(True), None, False),
        (status(inst()), probe(False), None, True),
        (status(UNREADY), None, None, True),
        (status(inst()), probe(True), "HighErrorRate", True),
    ],
)
def test_symptom(
    seen: WorkloadStatus, health: HealthProbe | None, alert: str | None, unwell: bool
) -> None:
    assert (rollback_symptom(seen, health, alert) is not None) is unwell


# --- service-high-memory ---------------------------------------------------------------------


def mem(name: str, used_mib: int | None, limit_mib: int | None) -> Instance:
    return inst(
        name,
        memory_usage_bytes=None if used_mib is None else used_mib * MIB,
        memory_limit_bytes=None if limit_mib is None else limit_mib * MIB,
    )


RELIEFS = [
    ("all under", status(mem("a", 100, 512), mem("b", 200, 512)), "restart", None, Relief.NONE),
    (
        "one over: restart",
        status(mem("a", 500, 512), mem("b", 200, 512)),
        "restart",
        None,
        Relief.RESTART,
    ),
    (
        "one over: scale",
        status(mem("a", 500, 512), desired_replicas=1),
        "scale",
        None,
        Relief.SCALE,
    ),
    (
        "scale at max: restart",
        status(*(mem(f"i{n}", 500, 512) for n in range(10)), desired_replicas=10),
        "scale",
        None,
        Relief.RESTART,
    ),
    ("unmeasured, no alert", status(mem("a", None, 512)), "restart", None, Relief.UNMEASURED),
    (
        "unmeasured, alert firing",
        status(mem("a", None, None)),
        "restart",
        "HighMemory",
        Relief.RESTART,
    ),
    (
        "no limit never counts as over",
        status(mem("a", 5000, None), mem("b", 10, 512)),
        "restart",
        None,
        Relief.NONE,
    ),
]


@pytest.mark.parametrize(
    ("case", "seen", "relief", "alert", "action"), RELIEFS, ids=[r[0] for r in RELIEFS]
)
def test_plan_memory_relief(
    case: str, seen: WorkloadStatus, relief: str, alert: str | None, action: Relief
) -> None:
    assert plan_memory_relief(seen, 0.9, relief, 10, alert).action is action


@pytest.mark.parametrize(
    ("text", "in_use"),
    [
        ("heap profile: 12: 4096 [345: 1048576] @ heap/1048576\n1: 4096 [1: 4096] @ 0x1", 4096),
        ("heap profile: 0: 0 [0: 0] @ heap/524288\n", 0),
        ("<html>not a profile</html>", None),
    ],
)
def test_pprof_in_use(text: str, in_use: int | None) -> None:
    assert pprof_in_use(text) == in_use
