"""What a person reads at 3 a.m.: report and actions-table rendering, event lines, how runs end
(data tables)."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

import cloudpickle
import pytest
from prefect.states import Completed, Failed

from deployments.catalog import RunbookSpec, load_catalog, load_flow
from runbooks.audit import TABLE_WIDTHS, ActionRow, describe_action, group_rows, table_row
from runbooks.errors import (
    ApprovalRejected,
    ApprovalTimedOut,
    BudgetSpent,
    Escalation,
    TargetBusy,
    VerificationFailed,
)
from runbooks.escalation import EscalationKind
from runbooks.params import RunbookParams
from runbooks.report import (
    IncidentReport,
    Notify,
    Outcome,
    before_after,
    clock,
    decide_ending,
    dry_run_name,
    ends_as_reported,
    nothing_done,
)
from runbooks.text import compact_list, cut, summarize_values

PIDS = [f"orders pid={p} (app/leaky-app)" for p in range(4101, 4126)]


@pytest.mark.parametrize(
    ("items", "max_chars", "expected"),
    [
        ([], None, ""),
        (["kafka/kafka-1"], None, "kafka/kafka-1"),
        (["kafka/kafka-1", "kafka/kafka-1"], None, "kafka/kafka-1"),
        # shared prefix and suffix written once; the prefix stops at a separator, not inside 41xx
        (PIDS[:3], None, "orders pid={4101, 4102, 4103} (app/leaky-app)"),
        (PIDS, 60, "orders pid={4101, 4102, 4103, … +22 more} (app/leaky-app)"),
        (
            PIDS,
            None,
            "orders pid={" + ", ".join(str(p) for p in range(4101, 4126)) + "} (app/leaky-app)",
        ),
        (["kafka/kafka-1", "kafka/kafka-2"], None, "kafka/kafka-{1, 2}"),
        (["a", "b", "c"], None, "a, b, c"),
        (["a", "b", "c"], 12, "a, … +2 more"),  # at least one item shows, the rest is counted
        (["a", "b", "c"], 8, "a, … +2…"),  # a width is a hard limit
        (["/wal/seg-0001.log", "/wal/seg-0002.log"], None, "/wal/seg-{0001, 0002}.log"),
        (["x pid=1", "x pid=12"], None, "x pid={1, 12}"),
        # only single words are factored out: the ids and counts of these ranges stay readable
        (
            ["db 1..9 (9 rows)", "db 10..19 (10 rows)"],
            None,
            "db 1..9 (9 rows), db 10..19 (10 rows)",
        ),
    ],
)
def test_compact_list(items: list[str], max_chars: int | None, expected: str) -> None:
    assert compact_list(items, max_chars) == expected
    if max_chars is not None:
        assert len(compact_list(items, max_chars)) <= max_chars


@pytest.mark.parametrize(
    ("text", "max_chars", "expected"),
    [
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("one two three four", 10, "one two t…"),
        ("multi\nline   text", None, "multi line text"),
    ],
)
def test_cut(text: str, max_chars: int | None, expected: str) -> None:
    assert cut(text, max_chars) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([None, None], ""),
        ([{}], ""),
        ([{"state": "idle", "idle_s": 320.1}], "state=idle, idle_s=320.1"),
        (
            [{"state": "idle", "idle_s": 17.2}, {"state": "idle", "idle_s": 19.0}],
            "state=idle, idle_s=17.2-19",
        ),
        (
            [{"state": "idle", "app": "a"}, {"state": "idle in transaction", "app": "a"}],
            "state=(2 values), app=a",
        ),
        ([{"gone": True}, {"gone": True}], "gone=true"),
        ([{"per_source": {"s1": 3}}], 'per_source={"s1":3}'),
        ([{"from": 3, "to": 9}, None], "from=3, to=9"),
        (["RUNNING", "RUNNING"], "RUNNING"),
        (["RUNNING", "FAILED"], "(2 values)"),
        ([{"a": 1}, {"b": 2}], "a=(2 values), b=(2 values)"),
    ],
)
def test_summarize_values(values: list, expected: str) -> None:
    assert summarize_values(values) == expected


def rows(
    n: int, status: str = "applied", after: dict | None = None, note: str = ""
) -> list[ActionRow]:
    return [
        ActionRow(
            step="terminate idle connections",
            action="terminate_backend",
            target=PIDS[i],
            status=status,
            before={"state": "idle", "idle_s": 300.0 + i, "client_addr": "10.0.0.7"},
            after=after,
            note=note,
        )
        for i in range(n)
    ]


def test_identical_actions_are_one_group_in_first_seen_order() -> None:
    mixed = [*rows(3), *rows(2, status="not applied"), *rows(1)]
    groups = group_rows(mixed)
    assert [(g.status, g.count) for g in groups] == [("applied", 4), ("not applied", 2)]
    assert groups[0].targets == [PIDS[0], PIDS[1], PIDS[2], PIDS[0]]


@pytest.mark.parametrize(
    ("group_of", "expected"),
    [
        (
            rows(25, after={"gone": True}),
            {
                "action": "terminate_backend",
                "n": "25",
                "targets": "orders pid={4101, … +24 more}…",
                "status": "applied",
                "before": "state=idle, idle_…",
                "after": "gone=true",
            },
        ),
        (
            rows(1, status="remediation budget spent (3 per 1h)"),
            {
                "action": "terminate_backend",
                "n": "1",
                "targets": "orders pid=4101 (app/leaky-ap…",
                "status": "remediation bud…",
                "before": "state=idle, idle_…",
                "after": "",
            },
        ),
        (
            rows(2, status="failed", note="OperationalError: server closed the connection"),
            {
                "action": "terminate_backend",
                "n": "2",
                "targets": "orders pid={4101, … +1 more}…",
                "status": "failed: Operati…",
                "before": "state=idle, idle_…",
                "after": "",
            },
        ),
    ],
)
def test_actions_table_row_is_short_and_summarized(
    group_of: list[ActionRow], expected: dict
) -> None:
    [group] = group_rows(group_of)
    row = table_row(group)
    assert row == expected
    assert list(row) == list(TABLE_WIDTHS)
    # one row never needs more than the widths allow: the table stays on a 1440 px screen
    assert all(len(row[k]) <= TABLE_WIDTHS[k] for k in row)
    assert sum(TABLE_WIDTHS.values()) <= 101  # what fit in Chromium at 1440 px


@pytest.mark.parametrize(
    ("action", "targets", "reason", "expected"),
    [
        (
            "terminate_backend",
            PIDS[:3],
            "",
            "terminate_backend ×3 on postgres db:5432: orders pid={4101, 4102, 4103} (app/leaky-app)",
        ),
        ("delete_pod", ["kafka/kafka-1"], "", "delete_pod on kafka-cluster k:9092: kafka/kafka-1"),
        (
            "delete_pod",
            ["kafka/kafka-1"],
            "remediation budget spent (3 per 1h)",
            "delete_pod on kafka-cluster k:9092: kafka/kafka-1 (remediation budget spent (3 per 1h))",
        ),
    ],
)
def test_event_line_says_what_on_what(
    action: str, targets: list[str], reason: str, expected: str
) -> None:
    on = "postgres db:5432" if action == "terminate_backend" else "kafka-cluster k:9092"
    assert describe_action(action, targets, on, reason) == expected


def test_event_line_of_many_targets_stays_one_screen_line() -> None:
    line = describe_action("terminate_backend", PIDS * 40, "postgres db:5432")
    assert line.startswith("terminate_backend ×1000 on postgres db:5432: orders pid={4101, ")
    assert len(line) <= 200 and "more}" in line


ESC, VF = Escalation("cluster-wide outage"), VerificationFailed("lag still 9000")
PAGE, OBSERVE, NOBODY = Notify.PAGE, Notify.OBSERVE, Notify.NOBODY


@pytest.mark.parametrize(
    ("exc", "dry_run", "outcome", "notify", "expected"),
    [
        (ESC, False, Outcome.ESCALATED, PAGE, True),
        (ApprovalRejected("bob"), False, Outcome.ESCALATED, PAGE, True),
        (ApprovalTimedOut("900s"), False, Outcome.ESCALATED, PAGE, True),
        (BudgetSpent("spent", notify=True), False, Outcome.ESCALATED, PAGE, True),
        # escalated once already for this spent budget: the run still ends FAILED, quietly
        (BudgetSpent("spent", notify=False), False, Outcome.ESCALATED, NOBODY, True),
        (VF, False, Outcome.FAILED, PAGE, True),
        (ValueError("bug"), False, Outcome.FAILED, PAGE, False),
        # Ctrl-C / SIGTERM of the serving process mid-run: nobody would know otherwise
        (KeyboardInterrupt(), False, Outcome.FAILED, PAGE, False),
        (TargetBusy("held by run x", escalate=True), False, Outcome.TARGET_BUSY, PAGE, True),
        # a dry-run never pages: what it would escalate completes it, observe channels hear it
        (ESC, True, Outcome.WOULD_ESCALATE, OBSERVE, True),
        (VF, True, Outcome.WOULD_ESCALATE, OBSERVE, True),
        (ApprovalRejected("bob"), True, Outcome.WOULD_ESCALATE, OBSERVE, True),
        (BudgetSpent("spent", notify=False), True, Outcome.WOULD_ESCALATE, NOBODY, True),
        (ValueError("bug"), True, Outcome.FAILED, OBSERVE, False),
        (KeyboardInterrupt(), True, Outcome.FAILED, OBSERVE, False),
        (TargetBusy("held by run x", escalate=True), True, Outcome.WOULD_ESCALATE, OBSERVE, True),
    ],
)
def test_decide_ending(
    exc: BaseException, dry_run: bool, outcome: Outcome, notify: Notify, expected: bool
) -> None:
    ending = decide_ending(exc, dry_run)
    assert (ending.outcome, ending.notify, ending.expected) == (outcome, notify, expected)


def test_a_cancelled_run_pages_nobody() -> None:
    """A person cancelled it (Prefect's cancellation interrupts the process): they know."""
    ending = decide_ending(KeyboardInterrupt(), dry_run=False, cancelled=True)
    assert (ending.notify, ending.kind) == (Notify.NOBODY, None)


@pytest.mark.parametrize(
    ("exc", "dry_run", "kind", "conclusion"),
    [
        (ESC, False, "escalated", "Escalated to a human: cluster-wide outage"),
        (ApprovalRejected("by bob"), False, "rejected", "Escalated to a human: by bob"),
        (ApprovalTimedOut("900s"), False, "approval_timeout", "Escalated to a human: 900s"),
        (
            BudgetSpent("3 per 1h", notify=True),
            False,
            "budget_spent",
            "Escalated to a human: 3 per 1h",
        ),
        (VF, False, "verification_failed", "Verification failed: lag still 9000"),
        (ValueError("bug"), False, "failed", "Run failed: ValueError: bug"),
        (
            KeyboardInterrupt(),
            False,
            EscalationKind.INTERRUPTED,
            "Run interrupted (KeyboardInterrupt) before it finished",
        ),
        (
            ESC,
            True,
            "escalated",
            "Would escalate to a human: cluster-wide outage (dry-run: nobody was paged)",
        ),
        (
            VF,
            True,
            "verification_failed",
            "Would escalate to a human: lag still 9000 (dry-run: nobody was paged)",
        ),
    ],
)
def test_ending_says_why(
    exc: BaseException, dry_run: bool, kind: str | None, conclusion: str
) -> None:
    ending = decide_ending(exc, dry_run)
    assert ending.kind == (EscalationKind(kind) if kind else None)
    assert ending.conclusion == conclusion


@pytest.mark.parametrize(
    ("exc", "dry_run", "state_type"),
    [
        (Escalation("x"), False, Failed),
        (VerificationFailed("x"), False, Failed),
        (Escalation("x"), True, Completed),
        (ValueError("x"), False, None),  # a real error keeps its traceback: no state, re-raised
        (ValueError("x"), True, None),
    ],
)
def test_ending_state(exc: BaseException, dry_run: bool, state_type) -> None:
    ending = decide_ending(exc, dry_run)
    state = ending.state(exc)
    if state_type is None:
        assert state is None
        return
    expected = state_type(message=ending.conclusion)
    assert state.type == expected.type and state.message == ending.conclusion


@pytest.mark.parametrize("spec", load_catalog(), ids=lambda s: s.name)
def test_every_runbook_ends_as_its_report_decided(spec: RunbookSpec) -> None:
    """Without the wrapper an escalation of that runbook logs a traceback at ERROR again."""
    wrapper_code = ends_as_reported(lambda: None).__code__
    flow = load_flow(spec)
    assert flow.fn.__code__ is wrapper_code
    # a served run gets its flow pickled into a fresh process (prefect's run_flow_in_subprocess)
    copy = pickle.loads(cloudpickle.dumps(flow))
    assert copy.fn.__code__.co_code == wrapper_code.co_code
    assert copy.fn.__wrapped__.__name__ == flow.fn.__wrapped__.__name__


def test_target_busy_is_not_decided_here() -> None:
    # incident_report ends a busy-target run itself (COMPLETED, nothing changed)
    assert not isinstance(TargetBusy("x"), Escalation | VerificationFailed)


@pytest.mark.parametrize(
    ("before", "after", "cell"),
    [
        ([{"state": "idle"}], [{"gone": True}], "`state=idle` → `gone=true`"),
        ([{"state": "idle"}], [None], "`state=idle` → -"),
        ([None], [None], "- → -"),
        # a masked secret stays literal text, not markdown emphasis; a backtick cannot end the code
        ([{"password": "**********"}], [None], "`password=**********` → -"),
        (["a`b"], ["c"], "`a'b` → `c`"),
    ],
)
def test_before_after_cell(before: list, after: list, cell: str) -> None:
    assert before_after(before, after) == cell


@pytest.mark.parametrize(
    ("outcome", "sentence"),
    [
        (None, "Nothing was changed so far."),
        (Outcome.RESOLVED, "No change was needed or made."),
        (Outcome.NO_ACTION_NEEDED, "No change was needed or made."),
        (Outcome.PLANNED, "No change was needed: nothing to plan."),
        (Outcome.WAITING, "Nothing was changed: waiting for the system to recover by itself."),
        (Outcome.TARGET_BUSY, "Nothing was changed: another run is acting on the target."),
        (Outcome.WOULD_ESCALATE, "Nothing was planned: the run would escalate before acting."),
        (Outcome.ESCALATED, "Nothing was changed: escalated before acting."),
        (Outcome.FAILED, "Nothing was changed: the run failed before acting."),
        (Outcome.AWAITING_APPROVAL, "Nothing was changed yet: waiting for a human's approval."),
    ],
)
def test_nothing_done_says_why(outcome: Outcome | None, sentence: str) -> None:
    assert nothing_done(outcome) == sentence


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_outcome_renders(outcome: Outcome) -> None:
    assert nothing_done(outcome)


@pytest.mark.parametrize(
    ("at", "text"),
    [
        (datetime(2026, 11, 22, 8, 38, 59, 123456, tzinfo=UTC), "08:38:59.123Z"),
        (datetime(2026, 11, 22, 8, 38, 59, 999999, tzinfo=UTC), "08:38:59.999Z"),
        (datetime(2026, 11, 22, 0, 0, 0, 0, tzinfo=UTC), "00:00:00.000Z"),
        (datetime(2026, 11, 22, 8, 38, 59, 7000, tzinfo=UTC), "08:38:59.007Z"),
    ],
)
def test_timeline_clock_has_milliseconds(at: datetime, text: str) -> None:
    assert clock(at) == text


@pytest.mark.parametrize(
    ("name", "observe", "expected"),
    [
        ("brave-fox", False, "dry-run: brave-fox"),
        ("dry-run: brave-fox", False, "dry-run: brave-fox"),  # a re-run is not prefixed twice
        ("brave-fox", True, "observe: brave-fox"),
        ("observe: brave-fox", True, "observe: brave-fox"),
    ],
)
def test_dry_run_name(name: str, observe: bool, expected: str) -> None:
    assert dry_run_name(name, observe) == expected


def report_of(outcome: Outcome | None, row_list: list[ActionRow], dry_run: bool = False) -> str:
    report = IncidentReport("sample", "Sample", "P2", RunbookParams(dry_run=dry_run))
    report.trigger = "direct call"
    report.started_at = datetime(2026, 11, 22, 8, 38, 59, 123456, tzinfo=UTC)
    report.timeline = []
    report.rows = row_list
    report.outcome = outcome
    return report.to_markdown()


@pytest.mark.parametrize(
    ("outcome", "row_list", "dry_run", "present", "absent"),
    [
        (
            Outcome.ESCALATED,
            [],
            False,
            ["### Actions taken\nNothing was changed: escalated before acting."],
            ["No change was needed or made."],
        ),
        (
            Outcome.FAILED,
            [],
            False,
            ["Nothing was changed: the run failed before acting."],
            ["No change was needed or made."],
        ),
        (
            Outcome.WOULD_ESCALATE,
            [],
            True,
            [
                "### Actions planned (dry-run)\nNothing was planned: the run would escalate",
                "**DRY-RUN: WOULD ESCALATE**",
            ],
            ["No change was needed or made."],
        ),
        (
            Outcome.RESOLVED,
            rows(25, after={"gone": True}),
            False,
            [
                "| Step | Action | Count | Targets | Status | Before → after |",
                "| terminate idle connections | terminate_backend | 25 | orders pid={4101, 4102, ",
                ", 4125} (app/leaky-app) | applied "
                "| `state=idle, idle_s=300-324, client_addr=10.0.0.7` → `gone=true` |",
            ],
            ["| orders pid=4101 (app/leaky-app) |"],
        ),
    ],
)
def test_report_sections(outcome, row_list, dry_run, present, absent) -> None:  # noqa: PLR0913
    md = report_of(outcome, row_list, dry_run)
    # a real header row, not an empty one
    assert "| Field | Value |\n|---|---|\n| Runbook | `sample` |" in md
    assert "| | |" not in md
    for fragment in present:
        assert fragment in md, f"{fragment!r} not in\n{md}"
    for fragment in absent:
        assert fragment not in md
