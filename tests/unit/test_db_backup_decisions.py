"""Decisions of database-backup and disaster-recovery-drill, as data tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.db_backup_format import (
    DumpManifest,
    StoredBackup,
    TableFingerprint,
    TableMismatch,
    backup_id_problem,
    backup_prefix,
    compare_tables,
    database_name_problem,
    is_scratch_left_behind,
    judge_drill,
    new_backup_id,
    plan_retention,
    scratch_comment,
    scratch_database_name,
    server_label,
    table_name_problem,
)

NOW = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def b(day: int, complete: bool = True, hour: int = 3) -> StoredBackup:
    return StoredBackup(backup_id=f"202611{day:02d}T{hour:02d}0000Z-00000000", complete=complete)


# backups, keep_last, protect -> (kept, deleted)
RETENTION_CASES = [
    ([], 7, set(), ([], [])),
    ([b(1), b(2), b(3)], 7, set(), ([1, 2, 3], [])),
    ([b(1), b(2), b(3)], 2, set(), ([2, 3], [1])),
    ([b(1), b(2), b(3)], 1, set(), ([3], [1, 2])),
    # an incomplete backup does not count towards keep_last: the two complete ones stay
    ([b(1), b(2), b(3, complete=False)], 2, set(), ([1, 2], [3])),
    # an incomplete backup younger than a day may still be running: kept
    ([b(1), b(30, complete=False, hour=4)], 1, set(), ([1, 30], [])),
    # the backup this run took is never deleted, even past keep_last
    ([b(1), b(2), b(3)], 1, {b(1).backup_id}, ([1, 3], [2])),
]


@pytest.mark.parametrize(("backups", "keep_last", "protect", "expected"), RETENTION_CASES)
def test_plan_retention(backups, keep_last, protect, expected) -> None:
    plan = plan_retention(backups, keep_last, NOW, protect=protect)
    days = lambda ids: sorted(int(i[6:8]) for i in ids)  # noqa: E731
    assert (days(plan.keep), days(plan.delete)) == expected
    assert set(plan.reasons) == set(plan.delete)


def fp(rows: int, checksum: str | None = "42") -> TableFingerprint:
    return TableFingerprint(rows=rows, checksum=checksum)


# expected, found -> descriptions of the mismatches
COMPARE_CASES = [
    ({"a.t": fp(3)}, {"a.t": fp(3)}, []),
    ({"a.t": fp(3)}, {}, ["a.t: missing from the restored database"]),
    ({"a.t": fp(3)}, {"a.t": fp(2)}, ["a.t: 2 rows restored, the backup had 3"]),
    ({"a.t": fp(3, "1")}, {"a.t": fp(3, "2")}, ["a.t: checksum 2 differs from the backup's 1"]),
    # a backup taken with counts only compares counts
    ({"a.t": fp(3, None)}, {"a.t": fp(3, "2")}, []),
    # tables the manifest does not list are not the drill's business
    ({"a.t": fp(3)}, {"a.t": fp(3), "a.u": fp(1)}, []),
]


@pytest.mark.parametrize(("expected", "found", "problems"), COMPARE_CASES)
def test_compare_tables(expected, found, problems) -> None:
    assert [m.describe() for m in compare_tables(expected, found)] == problems


def manifest(**overrides) -> DumpManifest:
    fields = dict(
        backup_id="20261201T030000Z-00000000",
        database="events",
        server="db:5432",
        server_version="15.19",
        tool="pg_dump (PostgreSQL) 15.19",
        snapshot_at=NOW,
        completed_at=NOW,
        database_bytes=1000,
        size=100,
        sha256="a" * 64,
        dump_seconds=1.0,
    )
    return DumpManifest(**(fields | overrides))


MISMATCH = TableMismatch(table="a.t", expected=fp(3), found=fp(2))

# sha256, size, restore error, mismatches, seconds, rto -> problems (by a word each)
DRILL_CASES = [
    ("a" * 64, 100, None, [], 5.0, 60.0, []),
    ("a" * 64, 100, None, [], 5.0, None, []),
    ("b" * 64, 100, "exit 1: could not uncompress data", [], 5.0, 60.0, ["corrupted", "pg_restore"]),
    ("b" * 64, 90, None, [], 5.0, 60.0, ["truncated", "corrupted"]),
    ("a" * 64, 100, None, [MISMATCH], 5.0, 60.0, ["2 rows restored"]),
    ("a" * 64, 100, None, [], 61.0, 60.0, ["recovery time objective"]),
]


@pytest.mark.parametrize(("sha", "size", "error", "mismatches", "seconds", "rto", "words"), DRILL_CASES)
def test_judge_drill(sha, size, error, mismatches, seconds, rto, words) -> None:
    verdict = judge_drill(manifest(), sha, size, error, mismatches, seconds, rto)
    assert verdict.ok == (not words)
    assert len(verdict.problems) == len(words)
    for problem, word in zip(verdict.problems, words, strict=True):
        assert word in problem


NAME_CASES = [
    ("events", None),
    ("match_events_2026", None),
    ("orders-db", None),
    ("", "not a database name"),
    ("x; DROP DATABASE prod", "not a database name"),
    ("../etc", "not a database name"),
    ("a" * 64, "not a database name"),
    ("1abc", "not a database name"),
]


@pytest.mark.parametrize(("name", "problem"), NAME_CASES)
def test_database_name_problem(name, problem) -> None:
    found = database_name_problem(name)
    assert (found is None) if problem is None else (problem in found)


TABLE_CASES = [
    ("public.events", None),
    ("audit.logins", None),
    ("events", "not schema.table"),
    ("public.events; --", "not schema.table"),
    ("a.b.c", "not schema.table"),
]


@pytest.mark.parametrize(("name", "problem"), TABLE_CASES)
def test_table_name_problem(name, problem) -> None:
    found = table_name_problem(name)
    assert (found is None) if problem is None else (problem in found)


ID_CASES = [
    (NOW, "1a2b3c4d-0000-0000", "20261201T030000Z-1a2b3c4d"),
    (NOW.replace(tzinfo=None).replace(tzinfo=UTC) + timedelta(seconds=5), "ABCDEF12", "20261201T030005Z-abcdef12"),
    (NOW, "manual", "20261201T030000Z-aa000000"),
]


@pytest.mark.parametrize(("at", "run_id", "backup_id"), ID_CASES)
def test_new_backup_id(at, run_id, backup_id) -> None:
    assert new_backup_id(at, run_id) == backup_id
    assert backup_id_problem(backup_id) is None


@pytest.mark.parametrize("bad", ["", "latest", "../../x", "20261201T030000Z", "20261201T030000Z-xyz"])
def test_backup_id_problem(bad) -> None:
    assert "not a backup id" in backup_id_problem(bad)


LAYOUT_CASES = [
    ("database-backups", "postgres", "db_5432", "events", "database-backups/postgres/db_5432/events/"),
    ("/nested/prefix/", "postgres", "db_5432", "events", "nested/prefix/postgres/db_5432/events/"),
    ("", "postgres", "db_5432", "events", "postgres/db_5432/events/"),
]


@pytest.mark.parametrize(("prefix", "engine", "server", "database", "key"), LAYOUT_CASES)
def test_backup_prefix(prefix, engine, server, database, key) -> None:
    assert backup_prefix(prefix, engine, server, database) == key


@pytest.mark.parametrize(
    ("host", "port", "label"),
    [("db.prod.internal", 5432, "db.prod.internal_5432"), ("::1", 5432, "__1_5432")],
)
def test_server_label(host, port, label) -> None:
    assert server_label(host, port) == label


SCRATCH_CASES = [
    ("events", "1a2b3c4d-aaaa", "events_drill_1a2b3c4d"),
    ("x" * 63, "1a2b3c4d", "x" * 48 + "_drill_1a2b3c4d"),
]


@pytest.mark.parametrize(("database", "run_id", "name"), SCRATCH_CASES)
def test_scratch_database_name(database, run_id, name) -> None:
    assert scratch_database_name(database, run_id) == name
    assert len(name) <= 63


# comment, this run -> left behind by another drill
LEFT_BEHIND_CASES = [
    (scratch_comment("run-1"), "run-2", True),
    (scratch_comment("run-2"), "run-2", False),  # this run's own
    ("production replica of events", "run-2", False),
    (None, "run-2", False),
    ("", "run-2", False),
]


@pytest.mark.parametrize(("comment", "run_id", "left"), LEFT_BEHIND_CASES)
def test_is_scratch_left_behind(comment, run_id, left) -> None:
    assert is_scratch_left_behind(comment, run_id) is left
