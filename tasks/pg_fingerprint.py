"""Rows and an order-independent checksum of PostgreSQL tables, read on several connections that
may share one exported snapshot (database-backup's manifest, disaster-recovery-drill's comparison)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import psycopg
from psycopg import sql

from blocks.postgres import PostgresDatabase
from tasks.db_backup_format import TableFingerprint


def fingerprint_connection(
    db: PostgresDatabase, dbname: str, autocommit: bool = True
) -> psycopg.Connection:
    """A session of ``db``'s settings on ``dbname``, with the settings a row's text depends on."""
    conn = db.model_copy(update={"dbname": dbname}).connect(autocommit=autocommit)
    # the settings a row's text depends on, the same in the source and in the scratch database;
    # counting a large table takes longer than the block's statement timeout allows
    conn.execute(
        "SET TIME ZONE 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres';"
        " SET extra_float_digits = 1; SET bytea_output = 'hex'; SET statement_timeout = 0"
    )
    return conn


def user_tables(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        " AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'"
        " ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


FINGERPRINT_WORKERS = 2  # connections reading the tables side by side
_RANGE_PAGES = 16_384  # 128 MiB of 8 KiB pages: a larger table is read in page ranges in parallel


def fingerprint_units(pages: dict[str, int], workers: int) -> list[tuple[str, int, int | None]]:
    """(table, first page, end page or None for "to the end") pieces of work, largest tables
    split into page ranges so that ``workers`` connections share the reading."""
    units: list[tuple[str, int, int | None]] = []
    for table, n in sorted(pages.items(), key=lambda kv: -kv[1]):
        parts = min(max(1, n // _RANGE_PAGES), workers * 4)
        if parts == 1:
            units.append((table, 0, None))
            continue
        step = -(-n // parts)
        for i in range(parts):
            units.append((table, i * step, None if i == parts - 1 else (i + 1) * step))
    return units


def _unit_query(table: str, first: int, end: int | None, checksums: bool) -> sql.Composed:
    schema, _, name = table.partition(".")
    what = (
        sql.SQL("count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)")
        if checksums
        else sql.SQL("count(*), 0")
    )
    where = []
    if first:
        where.append(sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({int(first)},0)")))
    if end is not None:
        where.append(sql.SQL("ctid < {}::tid").format(sql.Literal(f"({int(end)},0)")))
    query = sql.SQL("SELECT {} FROM {} AS t").format(what, sql.Identifier(schema, name))
    if where:  # a TID range scan (PostgreSQL 14+) reads only those pages
        query = query + sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
    return query


def fingerprint_tables(
    connect: Callable[[], psycopg.Connection],
    tables: list[str],
    checksums: bool,
    snapshot_id: str | None = None,
    workers: int = FINGERPRINT_WORKERS,
) -> dict[str, TableFingerprint]:
    """Rows and an order-independent checksum of each table, read on ``workers`` connections of
    ``connect()``, all in the exported snapshot ``snapshot_id`` when one is given.

    The checksum sums each row's 64-bit ``hashtextextended`` (of its text in UTC/ISO settings;
    the hash hash-partitioning uses, so it is stable across versions; a third of md5's cost): no
    sorting and constant memory however large the table; sums of page ranges add up, so a large
    table is read in ranges side by side. Equal exactly when the multisets of rows are (up to
    hash collisions).
    """
    if not tables:
        return {}
    conns = []
    try:
        for _ in range(workers):
            conn = connect()
            conn.autocommit = False
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            if snapshot_id:
                conn.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_id))
                )
            conns.append(conn)
        rows = conns[0].execute(
            "SELECT n.nspname || '.' || c.relname,"
            " pg_relation_size(c.oid) / current_setting('block_size')::int"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname || '.' || c.relname = ANY(%s)",
            (tables,),
        ).fetchall()
        units = fingerprint_units({t: int(p) for t, p in rows}, workers)
        work: queue.Queue[tuple[str, int, int | None]] = queue.Queue()
        for unit in units:
            work.put(unit)
        totals: dict[str, list[int]] = {t: [0, 0] for t in tables}
        lock = threading.Lock()
        errors: list[BaseException] = []

        def drain(conn: psycopg.Connection) -> None:
            try:
                while not errors:
                    try:
                        table, first, end = work.get_nowait()
                    except queue.Empty:
                        return
                    query = _unit_query(table, first, end, checksums)
                    count, total = conn.execute(query).fetchone()  # type: ignore[misc]
                    with lock:
                        totals[table][0] += count
                        totals[table][1] += int(total)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=drain, args=(c,), daemon=True) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return {
            t: TableFingerprint(rows=n, checksum=str(total) if checksums else None)
            for t, (n, total) in totals.items()
        }
    finally:
        for conn in conns:
            conn.close()

