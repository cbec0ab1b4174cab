"""Prefect Blocks: configuration of the systems runbooks act on. Configuration only; each builds its client."""

from blocks.aws import AwsAccount
from blocks.backup_store import BackupStore
from blocks.docker_host import DockerHost
from blocks.edge_gateway import EdgeGateway
from blocks.escalation import EscalationPolicy
from blocks.event_store import EventStore
from blocks.flink import FlinkCluster
from blocks.kafka import KafkaCluster
from blocks.kubernetes import KubernetesCluster
from blocks.mysql import MySQLDatabase
from blocks.postgres import PostgresDatabase
from blocks.prometheus import AlertmanagerServer, PrometheusServer
from blocks.redis import RedisServer
from blocks.spark import SparkCluster
from blocks.supervisor import SupervisorHost

__all__ = [
    "AlertmanagerServer",
    "BackupStore",
    "DockerHost",
    "EdgeGateway",
    "EscalationPolicy",
    "EventStore",
    "FlinkCluster",
    "KafkaCluster",
    "KubernetesCluster",
    "MySQLDatabase",
    "PostgresDatabase",
    "PrometheusServer",
    "RedisServer",
    "SupervisorHost",
    "AwsAccount",
    "SparkCluster",
]
