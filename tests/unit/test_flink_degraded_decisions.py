"""flink-job-degraded decisions as data tables: bottleneck, checkpoint trend, the rescale plan."""

from __future__ import annotations

import math

import pytest

from tasks.flink_degraded_decisions import (
    Bottleneck,
    CheckpointHealth,
    CheckpointSample,
    DegradedAction,
    VertexLoad,
    assess_checkpoints,
    backpressure_cleared,
    decide_degraded,
    find_bottleneck,
    growing,
    job_slots,
    max_backpressure,
    new_parallelism,
    ratio,
    topological_order,
)


def v(
    vid: str,
    bp: float | None,
    busy: float | None = 0.1,
    inputs: tuple[str, ...] = (),
    p: int = 1,
    maxp: int | None = 128,
) -> VertexLoad:
    return VertexLoad(
        id=vid,
        name=vid,
        parallelism=p,
        max_parallelism=maxp,
        inputs=list(inputs),
        backpressured=bp,
        busy=busy,
        idle=None if busy is None else max(0.0, 1 - busy - (bp or 0)),
    )


# --- which vertex is the bottleneck ---------------------------------------------------------

BOTTLENECK = [
    # (vertices, expected bottleneck, why)
    ([v("src", 0.0), v("agg", 0.0, inputs=("src",))], None, "nothing backpressured"),
    (
        [v("src", 0.9, busy=0.05), v("agg", 0.0, busy=0.98, inputs=("src",))],
        "agg",
        "source blocked by busy agg",
    ),
    (
        [v("agg", 0.0, busy=0.98, inputs=("src",)), v("src", 0.9, busy=0.05)],
        "agg",
        "listed out of order",
    ),
    (
        [
            v("src", 0.95),
            v("parse", 0.8, inputs=("src",)),
            v("enrich", 0.01, busy=0.99, inputs=("parse",)),
            v("sink", 0.0, busy=0.2, inputs=("enrich",)),
        ],
        "enrich",
        "first non-backpressured below a backpressured chain",
    ),
    (
        [v("src", 0.4), v("agg", 0.0, busy=0.6, inputs=("src",))],
        None,
        "low backpressure under the threshold",
    ),
    (
        [
            v("src", 0.9),
            v("a", 0.0, busy=0.5, inputs=("src",)),
            v("b", 0.0, busy=0.97, inputs=("src",)),
        ],
        "b",
        "fan-out: the busier branch",
    ),
    (
        [v("src", 0.9), v("sink", 0.9, inputs=("src",))],
        None,
        "backpressured down to the sink: the external system, no vertex to scale",
    ),
    (
        [v("src", 0.9, busy=None), v("agg", 0.0, busy=None, inputs=("src",))],
        "agg",
        "busy unknown still names the vertex below",
    ),
    (
        [
            v("s1", 0.9),
            v("s2", 0.0),
            v("join", 0.0, busy=0.99, inputs=("s1", "s2")),
        ],
        "join",
        "two inputs, one backpressured",
    ),
]


@pytest.mark.parametrize(
    ("vertices", "expected", "why"), BOTTLENECK, ids=[r[2] for r in BOTTLENECK]
)
def test_find_bottleneck(vertices: list[VertexLoad], expected: str | None, why: str) -> None:
    found = find_bottleneck(vertices, 0.5)
    assert (found.vertex.name if found else None) == expected


def test_bottleneck_names_what_it_holds_back() -> None:
    found = find_bottleneck([v("src", 0.9), v("agg", 0.0, busy=0.99, inputs=("src",))])
    assert found is not None
    assert found.backpressured_upstream == ["src"]
    assert "src backpressured by agg, busy 99%" in found.reason


def test_topological_order_puts_inputs_first() -> None:
    vs = [v("c", 0, inputs=("b",)), v("b", 0, inputs=("a",)), v("a", 0)]
    assert [x.id for x in topological_order(vs)] == ["a", "b", "c"]


RATIOS = [
    (None, None),
    (float("nan"), None),
    (0.0, 0.0),
    (500.0, 0.5),
    (1000.0, 1.0),
    (1200.0, 1.0),
]


@pytest.mark.parametrize(("ms", "expected"), RATIOS)
def test_ratio_of_ms_per_second(ms: float | None, expected: float | None) -> None:
    assert ratio(ms) == expected


def test_max_backpressure_and_slots() -> None:
    vs = [v("a", 0.2, p=2), v("b", None, p=4), v("c", 0.7, p=1)]
    assert max_backpressure(vs) == 0.7 and job_slots(vs) == 4
    assert max_backpressure([v("a", None)]) is None


# --- checkpoint trend -----------------------------------------------------------------------


def cp(
    i: int,
    dur: int | None = 1000,
    size: int | None = 1000,
    status: str = "COMPLETED",
    sp: bool = False,
) -> CheckpointSample:
    return CheckpointSample(
        id=i,
        status=status,
        is_savepoint=sp,
        duration_ms=dur,
        state_size=size,
        failure_message="Checkpoint expired before completing." if status == "FAILED" else None,
    )


CHECKPOINTS = [
    # (history, expected (slow, duration growing, size growing, failing), why)
    ([], (False, False, False, False), "no history"),
    ([cp(i) for i in range(1, 9)], (False, False, False, False), "steady"),
    ([cp(1), cp(2), cp(3, dur=90_000)], (True, False, False, False), "newest slow"),
    (
        [cp(i, dur=1000 * i) for i in range(1, 9)],
        (False, True, False, False),
        "durations growing",
    ),
    (
        [cp(i, size=1_000_000 * i) for i in range(1, 9)],
        (False, False, True, False),
        "state size growing",
    ),
    (
        [cp(1), cp(2, status="FAILED"), cp(3)],
        (False, False, False, True),
        "one failed in the window",
    ),
    (
        [cp(1), cp(2, status="FAILED", dur=None, size=None)],
        (False, False, False, True),
        "newest failed",
    ),
    (
        [cp(1), cp(2), cp(3, status="IN_PROGRESS")],
        (False, False, False, False),
        "in progress ignored",
    ),
    (
        [cp(1), cp(2), cp(3), cp(4, dur=500_000, sp=True)],
        (False, False, False, False),
        "savepoints left out",
    ),
    (
        [cp(1, dur=1000), cp(2, dur=1400), cp(3, dur=1000), cp(4, dur=1400)],
        (False, False, False, False),
        "noise",
    ),
    (
        # seen on a job just rescaled to parallelism 4: ratio over 1.5, but tens of milliseconds
        [cp(i, dur=d) for i, d in enumerate([29, 31, 30, 28, 33, 52, 61, 66, 70, 70], 1)],
        (False, False, False, False),
        "fast checkpoints a little slower: not growing",
    ),
    (
        [cp(i, dur=d) for i, d in enumerate([200, 300, 400, 500, 900, 1200, 1500, 1800], 1)],
        (False, True, False, False),
        "growing past a second",
    ),
    (
        [cp(3), cp(1, dur=90_000), cp(2)],
        (False, False, False, False),
        "sorted by id, not listed order",
    ),
]


@pytest.mark.parametrize(
    ("history", "expected", "why"), CHECKPOINTS, ids=[r[2] for r in CHECKPOINTS]
)
def test_assess_checkpoints(
    history: list[CheckpointSample], expected: tuple[bool, bool, bool, bool], why: str
) -> None:
    health = assess_checkpoints(history, slow_ms=60_000, growth_factor=1.5, max_failed=1)
    assert (health.slow, health.duration_growing, health.size_growing, health.failing) == expected
    assert health.unhealthy == any(expected)
    assert health.reason


def test_failing_threshold_counts_failures() -> None:
    history = [cp(1), cp(2, status="FAILED"), cp(3), cp(4, status="FAILED"), cp(5)]
    assert not assess_checkpoints(history, max_failed=3).failing
    assert assess_checkpoints(history, max_failed=2).failing
    assert (
        "2 of the last 5 failed (newest: Checkpoint expired" in assess_checkpoints(history).reason
    )


GROWING = [
    ([], False),
    ([1, 2, 3], False),
    ([1, 1, 2, 2], True),
    ([2, 2, 2, 2], False),
    ([0, 0, 1, 1], False),
]


@pytest.mark.parametrize(("values", "expected"), GROWING)
def test_growing(values: list[float], expected: bool) -> None:
    assert growing(values, 1.5) is expected


# --- the plan -------------------------------------------------------------------------------

NEW_PARALLELISM = [
    # (current, job slots, free slots, factor, max, state max, expected, why)
    (1, 1, 3, 2.0, 32, 128, 2, "double"),
    (2, 2, 10, 2.0, 32, 128, 4, "double again"),
    (4, 4, 1, 2.0, 32, 128, 5, "capped by free slots plus the job's own"),
    (4, 4, 0, 2.0, 32, 128, 4, "no free slot: no room"),
    (8, 8, 100, 2.0, 10, 128, 10, "capped by max parallelism"),
    (8, 8, 100, 2.0, 32, 12, 12, "capped by the state's max parallelism"),
    (1, 1, 10, 1.2, 32, 128, 2, "small factor still adds one"),
    (3, 3, 10, 1.5, 32, 128, 5, "rounded up"),
    (2, 4, 0, 2.0, 32, 128, 4, "bottleneck narrower than the job: its slots are enough"),
    (1, 1, 3, 4.0, 32, None, 4, "no state max"),
]


@pytest.mark.parametrize(
    ("current", "held", "free", "factor", "maxp", "state_max", "expected", "why"),
    NEW_PARALLELISM,
    ids=[r[-1] for r in NEW_PARALLELISM],
)
def test_new_parallelism(
    current: int,
    held: int,
    free: int,
    factor: float,
    maxp: int,
    state_max: int | None,
    expected: int,
    why: str,
) -> None:
    got = new_parallelism(
        current,
        job_slots=held,
        free_slots=free,
        factor=factor,
        max_parallelism=maxp,
        state_max_parallelism=state_max,
    )
    assert got == expected


def neck(p: int = 1, maxp: int | None = 128) -> Bottleneck:
    return Bottleneck(
        vertex=v("agg", 0.0, busy=0.99, inputs=("src",), p=p, maxp=maxp),
        backpressured_upstream=["src"],
        reason="src backpressured by agg",
    )


HEALTHY = CheckpointHealth(completed=5, reason="5 completed, none failed")
FAILING = CheckpointHealth(completed=3, failed_recent=2, failing=True, reason="2 failed")
SLOW = CheckpointHealth(completed=3, slow=True, reason="newest took 90s")

DECISIONS = [
    # (job state, bottleneck, checkpoints, job slots, free slots, expected action, new p, why)
    (None, None, None, 0, 0, DegradedAction.ESCALATE, None, "no job"),
    ("FAILED", None, None, 0, 4, DegradedAction.ESCALATE, None, "crashed job is another runbook's"),
    ("RESTARTING", neck(), HEALTHY, 1, 3, DegradedAction.ESCALATE, None, "not running"),
    ("RUNNING", None, HEALTHY, 1, 3, DegradedAction.NOTHING, None, "healthy"),
    ("RUNNING", None, None, 1, 3, DegradedAction.NOTHING, None, "healthy, checkpoints off"),
    (
        "RUNNING",
        None,
        FAILING,
        1,
        3,
        DegradedAction.ESCALATE,
        None,
        "failing checkpoints, no backpressure",
    ),
    (
        "RUNNING",
        None,
        SLOW,
        1,
        3,
        DegradedAction.ESCALATE,
        None,
        "slow checkpoints, no backpressure",
    ),
    ("RUNNING", neck(), HEALTHY, 1, 3, DegradedAction.RESCALE, 2, "backpressured with room"),
    (
        "RUNNING",
        neck(),
        FAILING,
        1,
        3,
        DegradedAction.RESCALE,
        2,
        "backpressure explains the failing checkpoints",
    ),
    ("RUNNING", neck(p=4), HEALTHY, 4, 0, DegradedAction.ESCALATE, None, "no free slot"),
    (
        "RUNNING",
        neck(p=4, maxp=4),
        HEALTHY,
        4,
        8,
        DegradedAction.ESCALATE,
        None,
        "state max reached",
    ),
]


@pytest.mark.parametrize(
    ("state", "bottleneck", "health", "held", "free", "action", "new_p", "why"),
    DECISIONS,
    ids=[r[-1] for r in DECISIONS],
)
def test_decide_degraded(
    state: str | None,
    bottleneck: Bottleneck | None,
    health: CheckpointHealth | None,
    held: int,
    free: int,
    action: DegradedAction,
    new_p: int | None,
    why: str,
) -> None:
    decision = decide_degraded(
        job_state=state,
        bottleneck=bottleneck,
        checkpoints=health,
        job_slots=held,
        free_slots=free,
        factor=2.0,
        max_parallelism=32,
    )
    assert decision.action is action
    assert decision.new_parallelism == new_p
    assert decision.reason


def test_backpressure_without_a_bottleneck_is_escalated_not_healthy() -> None:
    decision = decide_degraded(
        job_state="RUNNING",
        bottleneck=None,
        checkpoints=HEALTHY,
        job_slots=1,
        free_slots=3,
        backpressured=["src", "sink"],
    )
    assert decision.action is DegradedAction.ESCALATE
    assert "src, sink backpressured" in decision.reason


def test_escalations_say_why() -> None:
    state = decide_degraded(
        job_state="RUNNING", bottleneck=None, checkpoints=FAILING, job_slots=1, free_slots=3
    )
    assert "state problem" in state.reason and "not a capacity one" in state.reason
    full = decide_degraded(
        job_state="RUNNING", bottleneck=neck(p=4), checkpoints=HEALTHY, job_slots=4, free_slots=0
    )
    assert "no room to scale" in full.reason and "0 free slot(s)" in full.reason


CLEARED = [
    ([], 0.2, 3, False),
    ([0.9, 0.1, 0.1], 0.2, 3, False),
    ([0.9, 0.1, 0.1, 0.0], 0.2, 3, True),
    ([0.1, 0.1, None], 0.2, 3, False),
    ([0.1, 0.5, 0.1], 0.2, 3, False),
    ([0.2], 0.2, 1, True),
]


@pytest.mark.parametrize(("samples", "threshold", "needed", "expected"), CLEARED)
def test_backpressure_cleared(
    samples: list[float | None], threshold: float, needed: int, expected: bool
) -> None:
    assert backpressure_cleared(samples, threshold, needed) is expected


def test_nan_busy_is_not_a_number() -> None:
    assert ratio(math.nan) is None
