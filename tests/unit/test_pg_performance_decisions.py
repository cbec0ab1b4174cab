"""event-store-slow's decisions (tasks/pg_performance_decisions.py): index names, duplicate and
unused indexes, sequential-scan tables, and index candidates from EXPLAIN plans (shapes copied
from PostgreSQL 15's output)."""

from __future__ import annotations

import pytest

from tasks.pg_performance_decisions import (
    IndexCandidate,
    IndexInfo,
    TableStats,
    choose_candidates,
    connection_usage,
    covered_by,
    duplicate_indexes,
    explainable,
    filter_columns,
    index_columns_for,
    index_name,
    plan_candidates,
    plan_uses_index,
    seq_scan_heavy,
    stats_candidate,
    unused_indexes,
)

COLUMNS = {"id", "status", "updated_at", "created_at", "payload", "Event Type"}


@pytest.mark.parametrize(
    ("table", "columns", "expected"),
    [
        ("events", ("status", "updated_at"), "events_status_updated_at_idx"),
        ("events", ("status",), "events_status_idx"),
        # not a plain name: cleaned, plus a hash of the real names
        ("Event Log", ("state",), "event_log_state_idx_0d4b2b5c"),
        ("event_log", ("state",), "event_log_state_idx"),
    ],
)
def test_index_name(table, columns, expected) -> None:
    name = index_name(table, columns)
    if expected.startswith("event_log_state_idx_"):
        assert name.startswith("event_log_state_idx_") and len(name) == len(expected)
    else:
        assert name == expected
    assert index_name(table, columns) == name  # deterministic


def test_index_name_fits_and_differs_when_long() -> None:
    a = index_name("e" * 60, ("status", "updated_at"))
    b = index_name("e" * 60, ("status", "created_at"))
    assert len(a.encode()) <= 63 and len(b.encode()) <= 63 and a != b


def ix(name, columns, **kw) -> IndexInfo:
    return IndexInfo(table=kw.pop("table", "events"), name=name, columns=tuple(columns), **kw)


@pytest.mark.parametrize(
    ("indexes", "expected"),
    [
        # same columns: the plain one is redundant next to the primary key
        (
            [ix("pk", ["id"], primary=True, unique=True), ix("by_id", ["id"])],
            [("by_id", "pk", "same columns")],
        ),
        # same columns, neither special: the less used one goes
        (
            [ix("a", ["status"], scans=5), ix("b", ["status"], scans=0)],
            [("b", "a", "same columns")],
        ),
        # prefix of a longer btree
        ([ix("s", ["status"]), ix("su", ["status", "updated_at"])], [("s", "su", "prefix")]),
        # a unique prefix enforces something: kept
        ([ix("s", ["status"], unique=True), ix("su", ["status", "updated_at"])], []),
        # different order is not a prefix
        ([ix("u", ["updated_at"]), ix("su", ["status", "updated_at"])], []),
        # different tables, predicates, methods, invalid or expression indexes: not duplicates
        ([ix("a", ["status"]), ix("b", ["status"], table="other")], []),
        ([ix("a", ["status"]), ix("b", ["status"], predicate="(status = 'PENDING'::text)")], []),
        ([ix("a", ["status"]), ix("b", ["status"], method="hash")], []),
        ([ix("a", ["status"]), ix("b", ["status"], valid=False)], []),
        (
            [ix("a", ["(expr)"], has_expressions=True), ix("b", ["(expr)"], has_expressions=True)],
            [],
        ),
    ],
)
def test_duplicate_indexes(indexes, expected) -> None:
    assert [(d.index, d.of, d.kind) for d in duplicate_indexes(indexes)] == expected


@pytest.mark.parametrize(
    ("indexes", "min_size", "expected"),
    [
        ([ix("a", ["status"], scans=0, size_bytes=10), ix("b", ["x"], scans=3)], 0, ["a"]),
        ([ix("pk", ["id"], primary=True, unique=True, scans=0)], 0, []),
        ([ix("u", ["x"], unique=True, scans=0)], 0, []),
        ([ix("bad", ["x"], valid=False, scans=0)], 0, []),
        ([ix("small", ["x"], size_bytes=8192), ix("big", ["y"], size_bytes=10**9)], 10**6, ["big"]),
        ([ix("s", ["x"], size_bytes=1), ix("l", ["y"], size_bytes=2)], 0, ["l", "s"]),
    ],
)
def test_unused_indexes(indexes, min_size, expected) -> None:
    assert [i.name for i in unused_indexes(indexes, min_size)] == expected


def ts(table, seq_scan, seq_tup_read, idx_scan, live) -> TableStats:
    return TableStats(
        table=table,
        seq_scan=seq_scan,
        seq_tup_read=seq_tup_read,
        idx_scan=idx_scan,
        n_live_tup=live,
    )


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        ([ts("events", 50, 10_000_000, 3, 200_000)], ["events"]),
        ([ts("events", 50, 10_000_000, 500, 200_000)], []),  # mostly index scans
        ([ts("small", 5000, 5_000_000, 0, 1000)], []),  # small table
        ([ts("events", 50, 100_000, None, 200_000)], []),  # each scan reads a sliver
        ([ts("a", 10, 2_000_000, 0, 200_000), ts("b", 10, 9_000_000, 0, 900_000)], ["b", "a"]),
    ],
)
def test_seq_scan_heavy(stats, expected) -> None:
    assert [t.table for t in seq_scan_heavy(stats, 100_000)] == expected


@pytest.mark.parametrize(
    ("by_state", "max_conn", "used", "share"),
    [
        ({"idle": 30, "active": 10}, 100, 40, 0.4),
        ({}, 100, 0, 0.0),
        ({"idle in transaction": 95}, 100, 95, 0.95),
    ],
)
def test_connection_usage(by_state, max_conn, used, share) -> None:
    got_used, got_share, text = connection_usage(by_state, max_conn)
    assert (got_used, got_share) == (used, share)
    assert f"{used} of {max_conn}" in text


@pytest.mark.parametrize(
    ("expression", "equality", "ranges"),
    [
        ("(events.status = 'PENDING'::text)", ["status"], []),
        (
            "((events.status = 'PROCESSING'::text) AND (events.updated_at < (now() - '01:00:00'::interval)))",
            ["status"],
            ["updated_at"],
        ),
        ("((events.updated_at < $2) AND (events.status = $1))", ["status"], ["updated_at"]),
        ("((status)::text = 'x'::text)", ["status"], []),
        ("(status = ANY ('{COMPLETED,FAILED}'::text[]))", ["status"], []),
        ("(status <> 'DONE'::text)", [], []),  # an inequality: no index helps
        ("(payload ~~ '%x%'::text)", [], []),  # LIKE: not a btree column
        ("(lower(status) = 'x'::text)", [], []),  # a function of the column
        ("(e.\"Event Type\" = 'click'::text)", ["Event Type"], []),
        ("(created_at >= $1)", [], ["created_at"]),
        ("(unknown_col = 1)", [], []),
    ],
)
def test_filter_columns(expression, equality, ranges) -> None:
    assert filter_columns(expression, COLUMNS) == (equality, ranges)


@pytest.mark.parametrize(
    ("equality", "ranges", "sort", "expected"),
    [
        (["status"], ["updated_at"], [], ("status", "updated_at")),
        (["status"], [], ["updated_at"], ("status", "updated_at")),
        (["status"], [], ["status"], ("status",)),
        ([], ["updated_at"], ["id"], ("updated_at",)),
        ([], [], ["id"], ("id",)),
        ([], [], [], ()),
    ],
)
def test_index_columns_for(equality, ranges, sort, expected) -> None:
    assert index_columns_for(equality, ranges, sort) == expected


def seq_scan(filter_, plan_rows, **extra) -> dict:
    return {
        "Node Type": "Seq Scan",
        "Parallel Aware": extra.pop("parallel", False),
        "Relation Name": extra.pop("relation", "events"),
        "Schema": extra.pop("schema", "public"),
        "Alias": "events",
        "Plan Rows": plan_rows,
        "Filter": filter_,
        **extra,
    }


# the planner's plan for "WHERE status = 'PENDING' ORDER BY updated_at LIMIT 100" (PostgreSQL 15)
PENDING_OLDEST = [
    {
        "Plan": {
            "Node Type": "Limit",
            "Plans": [
                {
                    "Node Type": "Gather Merge",
                    "Workers Planned": 1,
                    "Plans": [
                        {
                            "Node Type": "Sort",
                            "Sort Key": ["events.updated_at"],
                            "Plans": [
                                seq_scan("(events.status = 'PENDING'::text)", 1137, parallel=True)
                            ],
                        }
                    ],
                }
            ],
        }
    }
]
ANALYZED = [
    {
        "Plan": {
            "Node Type": "Aggregate",
            "Plans": [
                seq_scan(
                    "(events.status = 'FAILED'::text)",
                    1887,
                    **{"Actual Rows": 2000, "Actual Loops": 1, "Rows Removed by Filter": 198000},
                )
            ],
        }
    }
]
GENERIC = {"Plan": seq_scan("((events.updated_at < $2) AND (events.status = $1))", 13072)}


@pytest.mark.parametrize(
    ("plan", "table_rows", "expected"),
    [
        # parallel estimate is per process: 1137 x 1.7 (one worker and the leader) kept
        (PENDING_OLDEST, 200_000, [(("status", "updated_at"), 200_000 - 1137 * 1.7)]),
        # measured (ANALYZE): rows removed by filter
        (ANALYZED, 200_000, [(("status",), 198_000)]),
        (GENERIC, 200_000, [(("status", "updated_at"), 200_000 - 13072)]),
        # keeps too much of the table: an index would not help
        ({"Plan": seq_scan("(events.status = 'COMPLETED'::text)", 190_000)}, 200_000, []),
        # too few rows thrown away
        ({"Plan": seq_scan("(events.status = 'X'::text)", 1)}, 5_000, []),
        # another table, another schema, no filter, an index scan: nothing
        ({"Plan": seq_scan("(status = 'X'::text)", 1, relation="other")}, 200_000, []),
        ({"Plan": seq_scan("(status = 'X'::text)", 1, schema="audit")}, 200_000, []),
        ({"Plan": seq_scan(None, 200_000)}, 200_000, []),
        (
            {
                "Plan": {
                    "Node Type": "Index Scan",
                    "Index Name": "x",
                    "Relation Name": "events",
                    "Filter": "(status = 'X'::text)",
                }
            },
            200_000,
            [],
        ),
        # a filter on no indexable column
        ({"Plan": seq_scan("(payload ~~ '%x%'::text)", 10)}, 200_000, []),
    ],
)
def test_plan_candidates(plan, table_rows, expected) -> None:
    found = plan_candidates(
        plan,
        "public",
        "events",
        COLUMNS,
        table_rows,
        min_rows_removed=10_000,
        max_selectivity=0.1,
        source="probe",
    )
    assert [(c.columns, c.rows_removed) for c in found] == expected


def cand(columns, removed=1000.0, table="events", source="p") -> IndexCandidate:
    return IndexCandidate(table=table, columns=tuple(columns), source=source, rows_removed=removed)


@pytest.mark.parametrize(
    ("candidate", "indexes", "covered"),
    [
        (cand(["status"]), [ix("su", ["status", "updated_at"])], "su"),
        (cand(["status", "updated_at"]), [ix("s", ["status"])], None),
        (cand(["status", "updated_at"]), [ix("su", ["status", "updated_at"], valid=False)], None),
        (cand(["status"]), [ix("p", ["status"], predicate="(x)")], None),
        (cand(["status"]), [ix("o", ["status"], table="other")], None),
        (cand(["status"]), [ix("h", ["status"], method="hash")], None),
    ],
)
def test_covered_by(candidate, indexes, covered) -> None:
    found = covered_by(candidate, indexes)
    assert (found.name if found else None) == covered


@pytest.mark.parametrize(
    ("candidates", "indexes", "limit", "expected"),
    [
        # the same columns from two plans: once, with the larger saving
        ([cand(["status"], 10), cand(["status"], 50, source="q")], [], 5, [(("status",), "q")]),
        # the most rows saved first, up to the limit
        ([cand(["a"], 10), cand(["b"], 90)], [], 1, [(("b",), "p")]),
        # already served by an index
        ([cand(["status"], 10)], [ix("su", ["status", "updated_at"])], 5, []),
        # an invalid leftover does not serve: proposed again
        ([cand(["status"], 10)], [ix("s", ["status"], valid=False)], 5, [(("status",), "p")]),
    ],
)
def test_choose_candidates(candidates, indexes, limit, expected) -> None:
    assert [
        (c.columns, c.source) for c in choose_candidates(candidates, indexes, limit)
    ] == expected


@pytest.mark.parametrize(
    ("stats", "indexes", "expected"),
    [
        (ts("events", 50, 10_000_000, 0, 200_000), [], ("status", "updated_at")),
        (ts("events", 50, 10_000_000, 0, 200_000), [ix("s", ["status", "id"])], None),
        (
            ts("events", 50, 10_000_000, 0, 200_000),
            [ix("s", ["status"], valid=False)],
            ("status", "updated_at"),
        ),
        (ts("events", 1, 200_000, 900, 200_000), [], None),
        (None, [], None),
    ],
)
def test_stats_candidate(stats, indexes, expected) -> None:
    found = stats_candidate("events", "status", "updated_at", stats, indexes, 100_000)
    assert (found.columns if found else None) == expected


@pytest.mark.parametrize(
    ("plan", "name", "expected"),
    [
        (
            {
                "Plan": {
                    "Node Type": "Limit",
                    "Plans": [{"Node Type": "Index Scan", "Index Name": "i"}],
                }
            },
            "i",
            True,
        ),
        (
            [
                {
                    "Plan": {
                        "Node Type": "Bitmap Heap Scan",
                        "Plans": [{"Node Type": "Bitmap Index Scan", "Index Name": "i"}],
                    }
                }
            ],
            "i",
            True,
        ),
        ({"Plan": {"Node Type": "Index Only Scan", "Index Name": "other"}}, "i", False),
        (PENDING_OLDEST, "i", False),
    ],
)
def test_plan_uses_index(plan, name, expected) -> None:
    assert plan_uses_index(plan, name) is expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT id FROM events WHERE status = $1 AND updated_at < $2 LIMIT $3", 3),
        ("select count(*) from events", 0),
        ("WITH x AS (SELECT id FROM events WHERE status = $1) SELECT * FROM x", 1),
        ("WITH d AS (DELETE FROM events WHERE id = $1 RETURNING *) SELECT * FROM d", None),
        ("UPDATE events SET status = $1", None),
        ("SELECT 1; DROP TABLE events", None),
        ("SELECT id FROM orders WHERE x = $1", None),
        ("EXPLAIN SELECT * FROM events", None),
    ],
)
def test_explainable(query, expected) -> None:
    assert explainable(query, "events") == expected
