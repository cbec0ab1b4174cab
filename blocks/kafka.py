"""Kafka cluster connection settings."""

from __future__ import annotations

import re
from typing import Any, Literal

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from prefect.blocks.core import Block
from pydantic import Field, field_validator

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr

_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")
_CHROOT = re.compile(r"(/[A-Za-z0-9_.-]+)+")


def parse_zookeeper_connect(connect: str) -> tuple[list[tuple[str, int]], str]:
    """Kafka's ``zookeeper.connect`` (``host:port,host:port/chroot``) as servers and chroot
    (empty when none); raises ValueError when it is not of that form."""
    hosts, slash, chroot = connect.strip().partition("/")
    chroot = f"/{chroot}" if slash else ""
    if chroot and not _CHROOT.fullmatch(chroot):
        raise ValueError(f"not a ZooKeeper chroot path: {chroot!r}")
    servers: list[tuple[str, int]] = []
    for item in hosts.split(","):
        match = _HOST_PORT.fullmatch(item.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"not a ZooKeeper host:port: {item.strip()!r}")
        servers.append((match["host"].strip("[]"), int(match["port"])))
    if len(set(servers)) != len(servers):
        raise ValueError("a ZooKeeper server is listed twice")
    return servers, chroot


class KafkaCluster(Block):
    """How to reach a Kafka (or Kafka-compatible) cluster, and what healthy looks like.

    Example:
        ```python
        from blocks.kafka import KafkaCluster
        admin = KafkaCluster.load("BLOCK_NAME").get_admin_client()
        ```
    """

    _block_type_name = "Runbooks Kafka Cluster"
    _block_type_slug = "runbooks-kafka-cluster"
    _description = "Bootstrap servers, SASL/TLS options and health expectations of a Kafka cluster."
    model_config = BLOCK_CONFIG

    bootstrap_servers: str = Field(
        description="Comma-separated host:port list, e.g. 'kafka-0:9092,kafka-1:9092'."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security.protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when the protocol is SASL_*."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: OptionalSecretStr = Field(None, description="SASL password.")
    ssl_ca_location: str | None = Field(None, description="Path of the CA bundle for TLS.")
    ssl_certificate_location: str | None = Field(None, description="Client certificate (mTLS).")
    ssl_key_location: str | None = Field(None, description="Client private key (mTLS).")
    ssl_key_password: OptionalSecretStr = Field(None, description="Password of the client key.")
    request_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Timeout of every admin/metadata request, in seconds."
    )
    expected_brokers: int | None = Field(
        None,
        ge=1,
        description="How many brokers a healthy cluster has; fewer in the metadata means brokers are down.",
    )

    zookeeper_connect: str | None = Field(
        None,
        description="Where the cluster still runs on ZooKeeper: the brokers' zookeeper.connect, "
        "e.g. 'zk-0:2181,zk-1:2181,zk-2:2181/kafka' (every server of the ensemble, optional "
        "chroot). The servers must allow the four-letter words ruok, srvr and mntr "
        "(4lw.commands.whitelist). Empty: KRaft, no ZooKeeper to check.",
    )

    @field_validator("zookeeper_connect")
    @classmethod
    def _zookeeper_connect_form(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_zookeeper_connect(value)
        return value.strip()

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka configuration for this cluster (contains secrets: never log it)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "socket.timeout.ms": int(self.request_timeout_s * 1000),
            "socket.connection.setup.timeout.ms": int(self.request_timeout_s * 1000),
            # librdkafka logs every failed connect attempt at level 3 (error): a down broker would
            # flood the run's output. Reachability is reported by the checks themselves.
            "log_level": 2,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password.get_secret_value()
            if self.ssl_key_password
            else None,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        conf.update(overrides)
        return conf

    def get_admin_client(self) -> AdminClient:
        return AdminClient(self.client_config())

    def get_producer(self, **overrides: Any) -> Producer:
        return Producer(self.client_config(**overrides))

    def get_consumer(self, group_id: str, **overrides: Any) -> Consumer:
        return Consumer(self.client_config(**{"group.id": group_id, **overrides}))
