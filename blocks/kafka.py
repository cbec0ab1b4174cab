"""Kafka cluster connection settings."""

from __future__ import annotations

from typing import Any, Literal

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from prefect.blocks.core import Block
from pydantic import Field

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr


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
