"""The durable spool: accepted alerts wait here (SQLite, WAL, fsync per commit) until Prefect has them.

The spool also decides what is new: an event id it already holds is a duplicate (the same alert
re-sent within its episode, see `alert_gateway.events`), and a fingerprint whose firing was
forwarded less than a cooldown ago is held back. Deciding and inserting happen in one
transaction, so concurrent requests cannot both forward the same alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'rejected')),
    accepted_at REAL NOT NULL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS events_pending ON events (seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS events_finished ON events (finished_at) WHERE state != 'pending';
CREATE TABLE IF NOT EXISTS cooldowns (
    fingerprint TEXT PRIMARY KEY,
    last_firing_at REAL NOT NULL
);
"""


class SpoolLocked(RuntimeError):
    """Another gateway process already uses this spool."""


class Decision(StrEnum):
    FORWARD = "forward"
    DUPLICATE = "duplicate"
    COOLDOWN = "cooldown"


def decide(
    status: str,
    already_spooled: bool,
    last_firing_at: float | None,
    now: float,
    cooldown_s: float,
) -> Decision:
    """Whether an incoming alert becomes a new event.

    An event id already spooled is never a new event: a resolved alert re-sent, or a firing one
    re-sent in the same episode. A resolved alert always passes the cooldown: runbooks wait for
    it to verify their fix. A firing alert is held back while its fingerprint's last forwarded
    firing is less than `cooldown_s` old; once that is over, a re-sent firing alert is in a
    later episode (episodes are `cooldown_s` long), so it has a new id and goes through.
    """
    if already_spooled:
        return Decision.DUPLICATE
    if status == "resolved" or last_firing_at is None:
        return Decision.FORWARD
    if now - last_firing_at < cooldown_s:
        return Decision.COOLDOWN
    return Decision.FORWARD


@dataclass(frozen=True)
class NewEvent:
    id: str
    fingerprint: str
    status: str
    body: str


@dataclass(frozen=True)
class SpooledEvent:
    id: str
    body: str
    accepted_at: float
    # delivery attempts that may have reached Prefect before this one (failed ones, and one
    # that was in flight when the gateway stopped: see ``Spool.__init__``)
    attempts: int = 0


class Spool:
    """A SQLite file of events, used from one thread of its own (``await spool.call(...)``).

    The methods are synchronous and run on the spool's single worker thread, so the event loop
    never waits on a disk sync and the one connection is never shared between threads.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # A second gateway on the same spool would deliver every event twice.
        self._lock_file = open(f"{path}.lock", "a+b")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolLocked(f"spool {path} is in use by another gateway process") from None
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"spool {path}: SQLite refused WAL mode (got {mode!r})")
        # FULL: a commit is on disk before the 202 that acknowledges it.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        # A pending event may have been in flight when this gateway last stopped (killed before
        # it could record the outcome): count that attempt, so the next one is sent under a new
        # id (alert_gateway.events.delivery_id) and cannot be dropped as its duplicate.
        self._db.execute("UPDATE events SET attempts = attempts + 1 WHERE state = 'pending'")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")

    async def call(self, method: Callable[..., T], *args: object) -> T:
        """Run ``method(*args)`` (a method of this spool) on the spool's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, method, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._db.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def accept(self, events: Sequence[NewEvent], now: float, cooldown_s: float) -> list[Decision]:
        """Store the events that are new (one durable commit); the decision for each, in order."""
        decisions = []
        with self._transaction():
            for event in events:
                spooled = self._db.execute("SELECT 1 FROM events WHERE id = ?", (event.id,))
                row = self._db.execute(
                    "SELECT last_firing_at FROM cooldowns WHERE fingerprint = ?",
                    (event.fingerprint,),
                ).fetchone()
                decision = decide(
                    event.status, spooled.fetchone() is not None, row[0] if row else None, now, cooldown_s
                )
                if decision is Decision.FORWARD:
                    self._db.execute(
                        "INSERT INTO events (id, fingerprint, body, accepted_at) VALUES (?, ?, ?, ?)",
                        (event.id, event.fingerprint, event.body, now),
                    )
                    if event.status == "firing":
                        self._db.execute(
                            "INSERT INTO cooldowns (fingerprint, last_firing_at) VALUES (?, ?) "
                            "ON CONFLICT (fingerprint) DO UPDATE SET last_firing_at = excluded.last_firing_at",
                            (event.fingerprint, now),
                        )
                decisions.append(decision)
        return decisions

    def pending(self, limit: int) -> list[SpooledEvent]:
        """The oldest undelivered events, in the order they were accepted."""
        rows = self._db.execute(
            "SELECT id, body, accepted_at, attempts FROM events WHERE state = 'pending'"
            " ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [SpooledEvent(*row) for row in rows]

    def mark_delivered(self, ids: Sequence[str], now: float) -> None:
        with self._transaction():
            self._db.executemany(
                "UPDATE events SET state = 'delivered', finished_at = ?, attempts = attempts + 1 "
                "WHERE id = ? AND state = 'pending'",
                [(now, i) for i in ids],
            )

    def mark_rejected(self, event_id: str, error: str, now: float) -> None:
        """Prefect refused the event itself (not a transient failure): keep it, stop sending it."""
        with self._transaction():
            self._db.execute(
                "UPDATE events SET state = 'rejected', finished_at = ?, attempts = attempts + 1, "
                "last_error = ? WHERE id = ? AND state = 'pending'",
                (now, error, event_id),
            )

    def record_failure(self, ids: Sequence[str], error: str) -> None:
        with self._transaction():
            self._db.executemany(
                "UPDATE events SET attempts = attempts + 1, last_error = ? WHERE id = ? AND state = 'pending'",
                [(error, i) for i in ids],
            )

    def depth(self) -> int:
        """How many accepted events Prefect does not have yet."""
        return self._db.execute("SELECT count(*) FROM events WHERE state = 'pending'").fetchone()[0]

    def prune(self, now: float, retention_s: float, cooldown_s: float) -> int:
        """Forget finished events past retention and cooldowns that expired; how many events."""
        with self._transaction():
            pruned = self._db.execute(
                "DELETE FROM events WHERE state != 'pending' AND finished_at < ?",
                (now - retention_s,),
            ).rowcount
            self._db.execute("DELETE FROM cooldowns WHERE last_firing_at < ?", (now - cooldown_s,))
        return pruned

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front: the dedup reads and the inserts are one unit.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
