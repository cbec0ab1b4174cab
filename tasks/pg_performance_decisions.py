"""event-store-slow's decisions, pure functions of catalog rows and EXPLAIN plans: index names,
duplicate and unused indexes, tables read by sequential scans, and index candidates from plans."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydantic import BaseModel, Field

MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def index_name(table: str, columns: list[str] | tuple[str, ...]) -> str:
    """The name of the index the runbook builds on ``table`` (``columns``): always the same for
    the same table and columns, so a re-run finds the index (or the invalid leftover of a killed
    build) instead of building a second one. ``<table>_<col>_<col>_idx`` when that is a plain
    name that fits PostgreSQL's 63 bytes; otherwise a cleaned, cut name plus a hash of the real
    names (two tables whose names clean up alike never share an index name)."""
    readable = "_".join([table, *columns, "idx"])
    if _PLAIN_NAME.fullmatch(readable) and len(readable) <= MAX_IDENTIFIER_BYTES:
        return readable
    digest = hashlib.sha256("\0".join([table, *columns]).encode()).hexdigest()[:8]
    cleaned = re.sub(r"[^a-z0-9_]+", "_", readable.lower()).strip("_") or "idx"
    return f"{cleaned[: MAX_IDENTIFIER_BYTES - 9]}_{digest}"


class IndexInfo(BaseModel):
    """One index as the catalog describes it."""

    table: str
    name: str
    columns: tuple[str, ...] = Field(description="Key columns in order ('(expr)' for expressions).")
    unique: bool = False
    primary: bool = False
    valid: bool = True
    method: str = "btree"
    predicate: str | None = None
    has_expressions: bool = False
    scans: int = 0
    size_bytes: int = 0
    definition: str = ""


class DuplicateIndex(BaseModel):
    table: str
    index: str
    of: str
    kind: str = Field(description="'same columns' or 'prefix' (its columns lead the other's).")
    size_bytes: int = 0


def _keep_rank(ix: IndexInfo) -> tuple:
    # of two indexes on the same columns, keep the primary key, then a unique one, the used one
    return (ix.primary, ix.unique, ix.scans, [-ord(c) for c in ix.name])


def duplicate_indexes(indexes: list[IndexInfo]) -> list[DuplicateIndex]:
    """Indexes another index makes redundant: the same key columns (same table, method and
    predicate; the one kept is the primary key, else a unique one, else the more used), or a
    non-unique btree whose columns are a leading prefix of another btree's. Expression and
    invalid indexes are left out (their columns say too little); a unique index is never called
    redundant by a prefix (it enforces a constraint the longer one does not)."""
    usable = [ix for ix in indexes if ix.valid and not ix.has_expressions]
    found: dict[str, DuplicateIndex] = {}
    for a in usable:
        for b in usable:
            if a.name == b.name or a.table != b.table or a.predicate != b.predicate:
                continue
            if a.method != b.method or a.name in found:
                continue
            if a.columns == b.columns:
                if _keep_rank(a) < _keep_rank(b):
                    found[a.name] = DuplicateIndex(
                        table=a.table,
                        index=a.name,
                        of=b.name,
                        kind="same columns",
                        size_bytes=a.size_bytes,
                    )
            elif (
                a.method == "btree"
                and not (a.unique or a.primary)
                and len(a.columns) < len(b.columns)
                and b.columns[: len(a.columns)] == a.columns
            ):
                found[a.name] = DuplicateIndex(
                    table=a.table, index=a.name, of=b.name, kind="prefix", size_bytes=a.size_bytes
                )
    return sorted(found.values(), key=lambda d: (d.table, d.index))


def unused_indexes(indexes: list[IndexInfo], min_size_bytes: int = 0) -> list[IndexInfo]:
    """Valid indexes never scanned since statistics were reset, that enforce nothing (not unique,
    not the primary key), largest first: candidates to drop after a human checks replicas."""
    unused = [
        ix
        for ix in indexes
        if ix.valid
        and ix.scans == 0
        and not ix.unique
        and not ix.primary
        and ix.size_bytes >= min_size_bytes
    ]
    return sorted(unused, key=lambda ix: (-ix.size_bytes, ix.table, ix.name))


class TableStats(BaseModel):
    table: str
    seq_scan: int
    seq_tup_read: int
    idx_scan: int | None
    n_live_tup: int


def seq_scan_heavy(stats: list[TableStats], min_live_rows: int) -> list[TableStats]:
    """Large tables read mostly by sequential scans: at least ``min_live_rows`` live rows, more
    sequential than index scans, and each sequential scan reading a tenth of the table or more on
    average (whole-table reads: a parallel scan counts once per process, each reading its share)."""
    heavy = [
        t
        for t in stats
        if t.n_live_tup >= min_live_rows
        and t.seq_scan > (t.idx_scan or 0)
        and t.seq_tup_read / max(1, t.seq_scan) >= t.n_live_tup / 10
    ]
    return sorted(heavy, key=lambda t: -t.seq_tup_read)


def connection_usage(by_state: dict[str, int], max_connections: int) -> tuple[int, float, str]:
    """(client connections, share of max_connections, a sentence naming them by state)."""
    used = sum(by_state.values())
    share = used / max_connections if max_connections else 0.0
    states = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items(), key=lambda kv: -kv[1]))
    return used, share, f"{used} of {max_connections} connections ({share:.0%}): {states or 'none'}"


class IndexCandidate(BaseModel):
    """An index that would let a scan read only the rows it keeps."""

    table: str
    columns: tuple[str, ...]
    source: str = Field(description="Which plan or statistic proposed it.")
    rows_removed: float = Field(0, description="Rows the scan read and threw away (per run).")
    reason: str = ""


_OPERATOR = re.compile(r"\s*(= ANY|=|<>|!=|<=|>=|<|>)")
_CAST = re.compile(r"\)?::[a-z_ ]+(?:\([0-9, ]+\))?(?:\[\])?\)?|\)")


def filter_columns(expression: str, columns: set[str]) -> tuple[list[str], list[str]]:
    """(equality columns, range columns) of the table's ``columns`` in a plan's Filter text,
    in order of appearance: ``col = x`` and ``col = ANY (...)`` are equality, ``<``, ``<=``, ``>``,
    ``>=`` ranges; a column compared otherwise (LIKE, a function of it) is neither. Columns may be
    quoted, cast (``(status)::text``) or qualified by the scan's alias."""
    equality: list[str] = []
    ranges: list[str] = []
    pattern = re.compile(
        r'(?:(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)\.)?(?:"((?:[^"]|"")+)"|([A-Za-z_][\w$]*))'
    )
    pos = 0
    while True:
        m = pattern.search(expression, pos)
        if not m:
            break
        pos = m.end()
        name = m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)
        if name not in columns or expression[m.end() : m.end() + 1] == "(":
            continue
        if re.search(r'[\w"]\($', expression[: m.start()]):
            continue  # an argument of a function: an index on the column does not serve
        rest = expression[m.end() :]
        while True:  # skip closing parentheses and casts after the column
            cast = _CAST.match(rest)
            if not cast or not cast.group(0):
                break
            rest = rest[cast.end() :]
        op = _OPERATOR.match(rest)
        if not op:
            continue
        target = equality if op.group(1) in ("=", "= ANY") else ranges
        if op.group(1) in ("<>", "!="):
            continue
        if name not in equality and name not in ranges:
            target.append(name)
    return equality, ranges


def index_columns_for(
    equality: list[str], ranges: list[str], sort_keys: list[str]
) -> tuple[str, ...]:
    """Equality columns first, then one range column, else the first sort column: the order
    in which a btree can narrow the scan (and, for the sort column, return rows in order)."""
    cols = list(equality)
    if ranges:
        cols.append(ranges[0])
    elif sort_keys and sort_keys[0] not in cols:
        cols.append(sort_keys[0])
    return tuple(cols)


def _sort_columns(keys: list[str], columns: set[str]) -> list[str]:
    found = []
    for key in keys:
        text = re.sub(r"\s+(DESC|ASC|NULLS (FIRST|LAST))", "", key).strip()
        text = text.split(".")[-1].strip('"')
        if text in columns:
            found.append(text)
        else:
            break  # an expression: later keys cannot use an index's order
    return found


def parallel_divisor(workers: int) -> float:
    """What PostgreSQL divides a parallel scan's rows by (costsize.c get_parallel_divisor):
    the workers, plus the leader's share (it helps less the more workers there are)."""
    return workers + max(0.0, 1.0 - 0.3 * workers)


def plan_candidates(
    plan: Any,
    schema: str,
    table: str,
    columns: set[str],
    table_rows: float,
    *,
    min_rows_removed: float,
    max_selectivity: float,
    source: str,
) -> list[IndexCandidate]:
    """Index candidates from an EXPLAIN (VERBOSE, FORMAT JSON) plan: each Seq Scan node on
    ``schema.table`` with a Filter on indexable columns that throws away at least
    ``min_rows_removed`` rows (measured when the plan was ANALYZEd, else estimated as the
    table's rows minus the node's estimate) and keeps at most ``max_selectivity`` of them. The
    columns: equality filters, then one range filter, else the sort key above the scan."""
    found: list[IndexCandidate] = []

    def walk(node: dict[str, Any], sort_keys: list[str], workers: int) -> None:
        workers = node.get("Workers Planned", workers)
        keys = sort_keys  # the order wanted of this node's rows
        if node.get("Node Type") in ("Sort", "Incremental Sort"):
            child_keys = _sort_columns(node.get("Sort Key", []), columns)
        elif node.get("Node Type") in ("Limit", "Gather Merge", "Gather"):
            child_keys = sort_keys
        else:
            child_keys = []
        if (
            node.get("Node Type") == "Seq Scan"
            and node.get("Relation Name") == table
            and node.get("Schema", schema) == schema
            and node.get("Filter")
        ):
            loops = node.get("Actual Loops") or 1
            if "Rows Removed by Filter" in node:
                removed = node["Rows Removed by Filter"] * loops
                kept = node.get("Actual Rows", 0) * loops
            else:
                # a parallel scan's estimate is per process: the workers and the leader's share
                divisor = parallel_divisor(workers) if node.get("Parallel Aware") else 1.0
                kept = node.get("Plan Rows", 0) * divisor
                removed = max(0.0, table_rows - kept)
            total = removed + kept
            equality, ranges = filter_columns(node["Filter"], columns)
            cols = index_columns_for(equality, ranges, keys)
            if cols and removed >= min_rows_removed and total and kept / total <= max_selectivity:
                found.append(
                    IndexCandidate(
                        table=table,
                        columns=cols,
                        source=source,
                        rows_removed=removed,
                        reason=f"sequential scan with filter {node['Filter']} keeps {kept:,.0f} "
                        f"and throws away {removed:,.0f} rows",
                    )
                )
        for child in node.get("Plans", []):
            walk(child, child_keys, workers)

    roots = plan if isinstance(plan, list) else [plan]
    for root in roots:
        walk(root.get("Plan", root), [], 0)
    return found


def stats_candidate(
    store_table: str,
    status_column: str,
    time_column: str,
    stats: TableStats | None,
    indexes: list[IndexInfo],
    min_live_rows: int,
) -> IndexCandidate | None:
    """The event store's own access path (status, then time) when its table is read mostly by
    sequential scans and no valid index leads with the status column."""
    if stats is None or not seq_scan_heavy([stats], min_live_rows):
        return None
    if any(
        ix.valid and ix.columns[:1] == (status_column,) for ix in indexes if ix.table == store_table
    ):
        return None
    return IndexCandidate(
        table=store_table,
        columns=(status_column, time_column),
        source="table statistics",
        rows_removed=float(stats.seq_tup_read),
        reason=f"{stats.seq_scan:,} sequential scans read {stats.seq_tup_read:,} rows "
        f"(index scans: {stats.idx_scan or 0:,}); no index leads with {status_column}",
    )


def covered_by(candidate: IndexCandidate, indexes: list[IndexInfo]) -> IndexInfo | None:
    """A valid plain btree index whose leading columns are the candidate's: it already serves."""
    n = len(candidate.columns)
    for ix in indexes:
        if (
            ix.table == candidate.table
            and ix.valid
            and ix.method == "btree"
            and ix.predicate is None
            and not ix.has_expressions
            and ix.columns[:n] == candidate.columns
        ):
            return ix
    return None


def choose_candidates(
    candidates: list[IndexCandidate], indexes: list[IndexInfo], limit: int
) -> list[IndexCandidate]:
    """Distinct column lists not served by an existing index, the most rows saved first.

    An INVALID index of the runbook's name does not serve (``covered_by`` skips it): the build
    is proposed again, and the build drops that leftover first."""
    best: dict[tuple[str, tuple[str, ...]], IndexCandidate] = {}
    for c in candidates:
        key = (c.table, c.columns)
        if covered_by(c, indexes) is None and (
            key not in best or c.rows_removed > best[key].rows_removed
        ):
            best[key] = c
    return sorted(best.values(), key=lambda c: -c.rows_removed)[:limit]


def plan_uses_index(plan: Any, name: str) -> bool:
    """Whether an EXPLAIN JSON plan scans the index ``name`` anywhere."""

    def walk(node: dict[str, Any]) -> bool:
        if node.get("Index Name") == name:
            return True
        return any(walk(child) for child in node.get("Plans", []))

    roots = plan if isinstance(plan, list) else [plan]
    return any(walk(r.get("Plan", r)) for r in roots)


_PARAM = re.compile(r"\$(\d+)")


def explainable(query: str, table: str) -> int | None:
    """How many parameters a statement from pg_stat_statements has, when the runbook may EXPLAIN
    its generic plan: one SELECT (or WITH ... SELECT) naming the table, no second statement;
    None otherwise."""
    text = query.strip().rstrip(";").strip()
    head = text[:10].lower()
    if ";" in text or not (head.startswith("select") or head.startswith("with")):
        return None
    if re.search(r"\b(insert|update|delete|merge)\b", text, re.IGNORECASE) and head.startswith(
        "with"
    ):
        return None
    if table.lower() not in text.lower():
        return None
    return max((int(n) for n in _PARAM.findall(text)), default=0)
