"""ZooKeeper ensemble of a Kafka cluster that still runs on it (``zkCli.sh stat``, seed 000 P1).

Each server is asked the four-letter words ``ruok``, ``srvr`` and ``mntr`` over its client port
(they need ``4lw.commands.whitelist``): its mode (leader, follower, standalone, observer),
outstanding requests, latency, and whether it serves at all. A server that lost its quorum
still answers ``imok`` to ``ruok`` but "not currently serving requests" to the others. The
broker ids registered under ``/brokers/ids`` are read with kazoo, which needs the quorum.

Whether a quorum exists is a pure function of the servers' answers, tested with data tables.
Nothing here writes to ZooKeeper, and no runbook restarts its nodes.
"""

from __future__ import annotations

import logging
import socket
from enum import StrEnum

from prefect import task
from pydantic import BaseModel, Field, computed_field

from blocks.kafka import KafkaCluster, parse_zookeeper_connect
from runbooks.retry import runbook_task_options

NOT_SERVING = "not currently serving requests"
NOT_WHITELISTED = "is not executed because it is not in the whitelist"
_MAX_ANSWER = 1 << 20  # mntr is ~20 KB; a server that sends more is not a ZooKeeper


def four_letter_word(host: str, port: int, word: str, timeout_s: float) -> str:
    """Send ``word`` to a ZooKeeper server's client port and read its whole answer (the server
    closes the connection after it)."""
    chunks: list[bytes] = []
    size = 0
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(word.encode("ascii"))
        while size < _MAX_ANSWER:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def parse_srvr(text: str) -> dict[str, str]:
    """``srvr``'s ``Key: value`` lines as a dict."""
    pairs = (line.partition(": ") for line in text.splitlines())
    return {k.strip(): v.strip() for k, sep, v in pairs if sep}


def parse_mntr(text: str) -> dict[str, str]:
    """``mntr``'s tab-separated ``zk_key value`` lines as a dict."""
    pairs = (line.partition("\t") for line in text.splitlines())
    return {k.strip(): v.strip() for k, sep, v in pairs if sep}


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class ZooKeeperServer(BaseModel):
    """One server of the ensemble, as its four-letter words describe it."""

    address: str = Field(description="host:port of its client port.")
    reachable: bool = Field(description="It accepted a connection and answered.")
    ok: bool | None = Field(
        None,
        description="It answered imok to ruok (running, maybe without quorum); None: ruok is "
        "not allowed.",
    )
    serving: bool = Field(False, description="It serves client requests (it is in a quorum).")
    mode: str | None = Field(None, description="leader, follower, observer or standalone.")
    outstanding: int | None = Field(None, description="Queued requests not yet answered.")
    latency_ms: str | None = Field(None, description="Request latency min/avg/max, in ms.")
    zxid: str | None = Field(None, description="Last transaction id it has seen.")
    znodes: int | None = Field(None, description="Number of znodes it holds.")
    synced_followers: int | None = Field(
        None, description="Followers in sync with it (leaders only; needs mntr)."
    )
    quorum_size: int | None = Field(None, description="Voting members it knows (needs mntr).")
    refused: list[str] = Field(
        default_factory=list,
        description="Four-letter words its 4lw.commands.whitelist does not allow.",
    )
    error: str | None = Field(None, description="Why it did not answer, or what it answered.")


def ask_server(host: str, port: int, timeout_s: float) -> ZooKeeperServer:
    """ruok, srvr and mntr of one server; a server that does not answer is a finding.

    ZooKeeper's default whitelist allows only srvr: the mode and latency come from it, and the
    words refused are listed (without mntr, a leader's synced followers are unknown).
    """
    address = f"{host}:{port}"
    try:
        answers = {w: four_letter_word(host, port, w, timeout_s) for w in ("ruok", "srvr", "mntr")}
    except OSError as exc:
        return ZooKeeperServer(
            address=address, reachable=False, error=f"{type(exc).__name__}: {exc}"
        )
    refused = [w for w, text in answers.items() if NOT_WHITELISTED in text]
    ok = None if "ruok" in refused else answers["ruok"].strip() == "imok"
    common = {"address": address, "reachable": True, "ok": ok, "refused": refused}
    if "srvr" in refused:
        return ZooKeeperServer(
            **common,
            error="srvr is not allowed, so whether it serves is unknown: add "
            "4lw.commands.whitelist=ruok,srvr,mntr to its zoo.cfg",
        )
    if NOT_SERVING in answers["srvr"]:
        return ZooKeeperServer(
            **common, error="running but not serving requests: it is not in a quorum"
        )
    stat = parse_srvr(answers["srvr"])
    metrics = {} if "mntr" in refused else parse_mntr(answers["mntr"])
    return ZooKeeperServer(
        **common,
        serving=True,
        mode=stat.get("Mode") or metrics.get("zk_server_state"),
        outstanding=_int(stat.get("Outstanding") or metrics.get("zk_outstanding_requests")),
        latency_ms=stat.get("Latency min/avg/max"),
        zxid=stat.get("Zxid"),
        znodes=_int(stat.get("Node count")),
        synced_followers=_int(metrics.get("zk_synced_followers")),
        quorum_size=_int(metrics.get("zk_quorum_size")),
    )


# --- the verdict --------------------------------------------------------------------------------


class QuorumVerdict(StrEnum):
    HEALTHY = "healthy"
    # a quorum serves, but some servers are down or out of it: one more loss may end it
    DEGRADED = "degraded"
    # servers answer but none serves: no leader, Kafka's controller cannot work
    QUORUM_LOST = "quorum lost"
    # no server answers at all
    UNREACHABLE = "unreachable"
    # servers answer but refuse srvr/mntr: the check cannot tell
    UNKNOWN = "unknown"


class EnsembleVerdict(BaseModel):
    verdict: QuorumVerdict
    has_quorum: bool | None = Field(description="None when the answers cannot tell.")
    leader: str | None = Field(description="The leader's (or standalone server's) address.")
    reason: str = Field(description="The evidence behind the verdict, in one sentence.")


def judge_ensemble(servers: list[ZooKeeperServer]) -> EnsembleVerdict:
    """Whether the ensemble has a quorum, from each server's answers.

    A leader exists only while a majority of the voters follows it (it steps down otherwise),
    and the servers outside a quorum refuse requests: a serving leader (or standalone server)
    is the quorum. The ensemble's size is the larger of the servers listed and the leader's
    ``zk_quorum_size``.
    """
    total = len(servers)
    size = max([total, *(s.quorum_size or 0 for s in servers)])
    majority = size // 2 + 1
    leaders = [s for s in servers if s.serving and s.mode in ("leader", "standalone")]
    serving = [s for s in servers if s.serving]
    down = [s.address for s in servers if not s.reachable]
    refused = [s for s in servers if "srvr" in s.refused]
    out = [s.address for s in servers if s.reachable and not s.serving and s not in refused]
    facts = [f"{len(serving)} of {size} server(s) serving"]
    not_allowed = sorted({w for s in servers for w in s.refused})
    if not_allowed:
        facts.append(f"four-letter words not allowed: {', '.join(not_allowed)}")
    if down:
        facts.append(f"not answering: {', '.join(down)}")
    if out:
        facts.append(f"running without quorum: {', '.join(out)}")
    if leaders:
        leader = leaders[0]
        synced = leader.synced_followers
        in_quorum = 1 + synced if synced is not None else len(serving)
        if leader.mode == "standalone":
            facts.insert(0, f"standalone server {leader.address} serving")
        else:
            facts.insert(0, f"leader {leader.address} with {in_quorum} of {size} voters in sync")
        healthy = in_quorum >= size and not down and not out
        return EnsembleVerdict(
            verdict=QuorumVerdict.HEALTHY if healthy else QuorumVerdict.DEGRADED,
            has_quorum=True,
            leader=leader.address,
            reason="; ".join(facts),
        )
    if refused:
        # a leader may be among the servers that do not say: no verdict without them
        return EnsembleVerdict(
            verdict=QuorumVerdict.UNKNOWN,
            has_quorum=None,
            leader=None,
            reason=f"{'; '.join(facts)}; {refused[0].error} "
            f"({', '.join(s.address for s in refused)})",
        )
    if len(down) == total:
        return EnsembleVerdict(
            verdict=QuorumVerdict.UNREACHABLE,
            has_quorum=False,
            leader=None,
            reason=f"no ZooKeeper server answers ({', '.join(down)})",
        )
    facts.append(f"no leader: a quorum needs {majority} of {size}")
    return EnsembleVerdict(
        verdict=QuorumVerdict.QUORUM_LOST, has_quorum=False, leader=None, reason="; ".join(facts)
    )


class ZooKeeperHealth(BaseModel):
    """One snapshot of a Kafka cluster's ZooKeeper ensemble."""

    servers: list[ZooKeeperServer]
    verdict: QuorumVerdict
    has_quorum: bool | None
    leader: str | None
    reason: str
    broker_ids: list[int] | None = Field(
        None, description="Broker ids registered under /brokers/ids; None when unreadable."
    )
    broker_ids_error: str | None = Field(None, description="Why the broker ids were not read.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def lost_quorum(self) -> bool:
        return self.verdict in (QuorumVerdict.QUORUM_LOST, QuorumVerdict.UNREACHABLE)


def _kazoo_errors() -> tuple[type[BaseException], ...]:
    from kazoo.exceptions import KazooException
    from kazoo.handlers.threading import KazooTimeoutError

    return (KazooException, KazooTimeoutError, OSError)


def registered_broker_ids(
    servers: list[tuple[str, int]], chroot: str, timeout_s: float
) -> list[int]:
    """Broker ids under ``<chroot>/brokers/ids`` (each live broker holds an ephemeral znode
    there); [] when no broker ever registered. Read-only; raises when no quorum answers."""
    from kazoo.client import KazooClient
    from kazoo.exceptions import NoNodeError

    hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in servers) + chroot
    # kazoo logs every failed connection attempt; the ensemble's state is reported instead
    client = KazooClient(
        hosts=hosts,
        timeout=timeout_s,
        connection_retry={"max_tries": 1, "delay": 0.1},
        logger=logging.getLogger("kazoo.runbooks.quiet"),
    )
    client.logger.setLevel(logging.CRITICAL)
    try:
        client.start(timeout=timeout_s)
        try:
            children = client.get_children("/brokers/ids")
        except NoNodeError:
            return []
        return sorted(int(c) for c in children if c.isdigit())
    finally:
        client.stop()
        client.close()


@task(**runbook_task_options())
def check_zookeeper(cluster: KafkaCluster) -> ZooKeeperHealth | None:
    """The ensemble named by the block's ``zookeeper_connect`` (None when the cluster has none):
    each server's four-letter words, whether a quorum exists, and the broker ids registered.

    Not retried: a server that does not answer is the finding. Every network call is bounded
    by the block's ``request_timeout_s``.
    """
    if not cluster.zookeeper_connect:
        return None
    servers, chroot = parse_zookeeper_connect(cluster.zookeeper_connect)
    timeout = cluster.request_timeout_s
    answers = [ask_server(host, port, timeout) for host, port in servers]
    verdict = judge_ensemble(answers)
    broker_ids: list[int] | None = None
    error: str | None = None
    if verdict.has_quorum:
        try:
            broker_ids = registered_broker_ids(servers, chroot, timeout)
        except _kazoo_errors() as exc:  # a finding, like a server that does not answer
            error = f"{type(exc).__name__}: {exc}"
    else:
        error = "not read: no quorum serves requests"
    return ZooKeeperHealth(
        servers=answers,
        verdict=verdict.verdict,
        has_quorum=verdict.has_quorum,
        leader=verdict.leader,
        reason=verdict.reason,
        broker_ids=broker_ids,
        broker_ids_error=error,
    )
