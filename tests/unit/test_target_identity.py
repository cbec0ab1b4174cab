"""What a Flink JobManager and a WAL directory are known by, however a block names them (issue #9
defect 4). PostgreSQL and Kafka ask the server itself: tests/integration/test_safety.py and
test_kafka_cluster_down.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks.edge_gateway import EdgeGateway
from blocks.flink import FlinkCluster
from tasks.flink import get_jobmanager_address
from tasks.wal import get_wal_identity


def jobmanager(url: str) -> str:
    return get_jobmanager_address.fn(FlinkCluster(rest_url=url, request_timeout_s=5))


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("http://localhost:8081", "http://127.0.0.1:8081/", True),
        ("http://LOCALHOST:8081/", "http://127.0.0.1:8081", True),
        ("http://localhost", "http://127.0.0.1:80", True),
        ("https://localhost", "https://127.0.0.1:443/", True),
        ("http://127.0.0.1:8081", "http://127.0.0.1:8082", False),
        # one proxy in front of two clusters
        ("http://127.0.0.1/flink-a", "http://127.0.0.1/flink-b", False),
        ("http://127.0.0.1:8081", "https://127.0.0.1:8081", False),
    ],
)
def test_jobmanager_address(a: str, b: str, same: bool) -> None:
    assert (jobmanager(a) == jobmanager(b)) is same


def test_jobmanager_address_is_resolved() -> None:
    assert jobmanager("http://localhost:8081/flink/") == "http://127.0.0.1:8081/flink"


def test_unknown_jobmanager_host_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Flink host 'no-such-host.invalid' does not resolve"):
        jobmanager("http://no-such-host.invalid:8081")


def wal_identity(directory: Path | str) -> str:
    return get_wal_identity.fn(EdgeGateway(gateway_name="gw", wal_directory=str(directory)))


def test_one_wal_directory_by_any_path_is_one_identity(tmp_path: Path) -> None:
    real = tmp_path / "wal"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "other").mkdir()
    names = [real, tmp_path / "link", tmp_path / "other" / ".." / "wal", f"{real}/"]
    assert len({wal_identity(n) for n in names}) == 1
    assert wal_identity(real).endswith(f":{real.resolve()}")
    assert wal_identity(tmp_path / "other") != wal_identity(real)
