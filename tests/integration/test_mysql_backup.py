"""MariaDB backups (tasks.mysql_backup) against the session's real MariaDB 10.11 and moto's S3:
a mariadb-dump gzip'd into S3 restores into a scratch database with every table's rows and
checksum equal to the manifest; a corrupted object is caught; a dry run writes nothing.

The module has its own database (two tables with NULLs, blobs, decimals, UTF-8, a trigger, a
procedure and an event) and a backup user with what dump and restore need.
"""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from blocks.backup_store import BackupStore
from blocks.mysql import MySQLDatabase
from tasks.db_backup_format import DUMP, MANIFEST, compare_tables
from tasks.mysql_backup import (
    backup_location,
    drop_mysql_scratch,
    dump_mysql_database,
    fingerprint_mysql_database,
    mysql_scratch_left_behind,
    restore_mysql_into_scratch,
)
from tests.mariadb_server import MariaDBServer
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer

pytestmark = pytest.mark.integration


@dataclass
class Env:
    server: MariaDBServer
    db: str
    block: MySQLDatabase
    store: BackupStore

    def root(self, *queries: str) -> list:
        with self.server.admin() as conn, conn.cursor() as cur:
            out = []
            for q in queries:
                cur.execute(q)
                out.append(cur.fetchall())
            return out


@pytest.fixture(scope="module")
def env(mariadb: MariaDBServer, moto: MotoServer) -> Iterator[Env]:
    suffix = uuid.uuid4().hex[:8]
    db, user, password = f"rbmybk_{suffix}", f"rbmybkop_{suffix}", f"pw\"'\\ {uuid.uuid4().hex}"
    e = Env(mariadb, db, None, None)  # type: ignore[arg-type]
    with mariadb.admin() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{db}`")
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (user, password))
        cur.execute(f"GRANT ALL ON `{db}`.* TO %s@'%%'", (user,))
        cur.execute(f"GRANT ALL ON `{db}\\_drill\\_%%`.* TO %s@'%%'", (user,))
        cur.execute("GRANT PROCESS ON *.* TO %s@'%%'", (user,))
        cur.execute(f"USE `{db}`")
        cur.execute(
            "CREATE TABLE orders (id INT PRIMARY KEY, customer VARCHAR(40), amount DECIMAL(12,4),"
            " note TEXT NULL, blob_col VARBINARY(32) NULL, at DATETIME(6) NOT NULL)"
        )
        cur.execute(
            "INSERT INTO orders SELECT seq, CONCAT('klant-ö-', seq % 97), seq / 7,"
            " IF(seq % 5 = 0, NULL, REPEAT('x\\n\\'', seq % 13)), UNHEX(MD5(seq)),"
            " '2026-01-01' + INTERVAL seq MINUTE FROM seq_1_to_5000"
        )
        cur.execute("CREATE TABLE totals (customer VARCHAR(40) PRIMARY KEY, n INT NOT NULL)")
        cur.execute("INSERT INTO totals SELECT customer, COUNT(*) FROM orders GROUP BY customer")
        cur.execute(
            f"CREATE DEFINER = '{user}'@'%' TRIGGER orders_ai AFTER INSERT ON orders FOR EACH ROW "
            "INSERT INTO totals VALUES (NEW.customer, 1) ON DUPLICATE KEY UPDATE n = n + 1"
        )
        cur.execute(
            f"CREATE DEFINER = '{user}'@'%' PROCEDURE order_count() SELECT COUNT(*) FROM orders"
        )
    bucket = f"mysql-backups-{suffix}"
    moto.client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": moto.region}
    )
    e.store = BackupStore(
        bucket=bucket, prefix="database-backups", endpoint_url=moto.endpoint_url,
        region=moto.region, aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY, timeout_s=10,
    )  # fmt: skip
    e.block = MySQLDatabase(
        host=mariadb.host, port=mariadb.port, database=db, user=user, password=password,
        connect_timeout_s=5, read_timeout_s=60,
    )  # fmt: skip
    yield e
    rows = e.root(f"SHOW DATABASES LIKE '{db}%'")[0]
    e.root(*[f"DROP DATABASE `{name}`" for (name,) in rows], f"DROP USER '{user}'@'%'")


def objects(env: Env) -> list[str]:
    listed = env.store.get_s3_client().list_objects_v2(Bucket=env.store.bucket)
    return [o["Key"] for o in listed.get("Contents", [])]


def backup_id() -> str:
    return f"20261201T023000Z-{uuid.uuid4().hex[:8]}"


def test_backup_restores_into_a_scratch_database_with_equal_tables(env: Env) -> None:
    bid = backup_id()
    result = dump_mysql_database(env.block, env.store, env.db, bid, dry_run=False)
    manifest = result.manifest
    assert manifest is not None and manifest.engine == "mysql" and manifest.format == "sql.gz"
    assert manifest.tables["orders"].rows == 5000 and manifest.tables["totals"].rows == 97
    location = backup_location(env.store, env.block, env.db)
    assert f"{location}{bid}/{MANIFEST}" in objects(env)
    raw = env.store.get_s3_client().get_object(
        Bucket=env.store.bucket, Key=f"{location}{bid}/{DUMP}"
    )
    text = gzip.decompress(raw["Body"].read())
    assert b"CREATE TABLE `orders`" in text and b"CREATE DATABASE" not in text
    assert b"PROCEDURE `order_count`" in text and b"TRIGGER" in text

    # taking it again is a no-op
    again = dump_mysql_database(env.block, env.store, env.db, bid, dry_run=False)
    assert again.already_complete and not again.applied

    scratch = f"{env.db}_drill_{uuid.uuid4().hex[:8]}"
    restored = restore_mysql_into_scratch(
        env.block, env.store, manifest, location, scratch, "run-1", dry_run=False
    )
    assert restored.error is None, restored.error
    assert restored.sha256 == manifest.sha256
    after = fingerprint_mysql_database(env.block, scratch)
    assert compare_tables(manifest.tables, after) == []
    assert after == manifest.tables
    (routines,) = env.root(
        f"SELECT ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = '{scratch}'"
    )
    assert routines == (("order_count",),)

    # another run's drill sees it as left behind; this run's does not
    assert mysql_scratch_left_behind(env.block, env.db, "run-2") == [scratch]
    assert mysql_scratch_left_behind(env.block, env.db, "run-1") == []
    assert drop_mysql_scratch(env.block, [scratch], dry_run=False).applied
    assert env.root(f"SHOW DATABASES LIKE '{scratch}'")[0] == ()
    # the source database carries no drill mark: never dropped
    assert not drop_mysql_scratch(env.block, [env.db], dry_run=False).applied
    assert env.root(f"SHOW DATABASES LIKE '{env.db}'")[0] != ()


def test_a_changed_row_shows_in_the_fingerprints(env: Env) -> None:
    before = fingerprint_mysql_database(env.block, env.db)
    env.root(f"UPDATE `{env.db}`.orders SET amount = amount + 1 WHERE id = 4242")
    try:
        after = fingerprint_mysql_database(env.block, env.db)
        assert after["orders"].rows == before["orders"].rows
        assert after["orders"].checksum != before["orders"].checksum
        assert after["totals"] == before["totals"]
    finally:
        env.root(f"UPDATE `{env.db}`.orders SET amount = amount - 1 WHERE id = 4242")


def test_a_corrupted_object_is_caught(env: Env) -> None:
    bid = backup_id()
    manifest = dump_mysql_database(env.block, env.store, env.db, bid, dry_run=False).manifest
    location = backup_location(env.store, env.block, env.db)
    s3 = env.store.get_s3_client()
    key = f"{location}{bid}/{DUMP}"
    body = bytearray(s3.get_object(Bucket=env.store.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket=env.store.bucket, Key=key, Body=bytes(body))

    scratch = f"{env.db}_drill_{uuid.uuid4().hex[:8]}"
    restored = restore_mysql_into_scratch(
        env.block, env.store, manifest, location, scratch, "run-2",
        dry_run=False,
    )  # fmt: skip
    assert restored.error is not None and not restored.applied
    assert drop_mysql_scratch(env.block, [scratch], dry_run=False).applied


def test_dry_run_writes_nothing(env: Env) -> None:
    before = objects(env)
    bid = backup_id()
    result = dump_mysql_database(env.block, env.store, env.db, bid, dry_run=True)
    assert result.planned and not result.applied and result.manifest is None
    assert objects(env) == before
    scratch = f"{env.db}_drill_{uuid.uuid4().hex[:8]}"
    restore_mysql_into_scratch(
        env.block, env.store, result.manifest or _any_manifest(env), "s3://x/y/", scratch, "run-3",
        dry_run=True,
    )  # fmt: skip
    assert env.root(f"SHOW DATABASES LIKE '{scratch}'")[0] == ()


def _any_manifest(env: Env):
    from tasks.db_backup_format import DumpManifest

    return DumpManifest(
        engine="mysql", backup_id=backup_id(), database=env.db, server="x:1", server_version="x",
        tool="x", snapshot_at="2026-01-01T00:00:00Z", completed_at="2026-01-01T00:00:00Z",
        database_bytes=0, size=0, sha256="0", dump_seconds=0,
    )  # fmt: skip


def test_database_backup_flow_with_engine_mysql(env: Env) -> None:
    from flows.postgres.database_backup import DatabaseBackupParams, database_backup
    from runbooks.params import SafetyParams
    from runbooks.report import Outcome
    from tests.conftest import unique

    db_block, store_block = unique("mysql-backup-db"), unique("mysql-backup-store")
    env.block.save(db_block, overwrite=True)
    env.store.save(store_block, overwrite=True)
    params = DatabaseBackupParams(
        engine="mysql", db_block=db_block, backup_store_block=store_block,
        safety=SafetyParams(budget_max_actions=1000),
    )  # fmt: skip

    dry = database_backup(params=params.model_copy(update={"dry_run": True}), return_state=True)
    assert dry.is_completed(), dry.message
    assert dry.result().outcome is Outcome.PLANNED

    state = database_backup(params=params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    assert summary.manifest.engine == "mysql" and summary.manifest.tables["orders"].rows == 5000
    location = backup_location(env.store, env.block, env.db)
    assert f"{location}{summary.backup_id}/{MANIFEST}" in objects(env)
    assert env.block.password.get_secret_value() not in summary.report


def test_disaster_recovery_drill_with_engine_mysql(env: Env) -> None:
    from flows.postgres.database_backup import DatabaseBackupParams, database_backup
    from flows.postgres.disaster_recovery_drill import DrillParams, disaster_recovery_drill
    from runbooks.params import SafetyParams
    from runbooks.report import Outcome
    from tests.conftest import unique

    db_block, store_block = unique("mysql-drill-db"), unique("mysql-drill-store")
    env.block.save(db_block, overwrite=True)
    env.store.save(store_block, overwrite=True)
    safety = SafetyParams(budget_max_actions=1000)
    backup = database_backup(
        params=DatabaseBackupParams(
            engine="mysql", db_block=db_block, backup_store_block=store_block, safety=safety
        ),
        return_state=True,
    )
    assert backup.is_completed(), backup.message
    backup_id = backup.result().backup_id
    # a drill killed before its cleanup left a marked scratch database behind
    stale = f"{env.db}_drill_deadbeef"
    env.root(
        f"CREATE DATABASE `{stale}`",
        f"CREATE TABLE `{stale}`._runbooks_drill (run_id VARCHAR(64) PRIMARY KEY,"
        " created_at DATETIME NOT NULL)",
        f"INSERT INTO `{stale}`._runbooks_drill VALUES ('dead-run', NOW())",
    )
    params = DrillParams(
        engine="mysql", db_block=db_block, backup_store_block=store_block, backup_id=backup_id,
        safety=safety,
    )  # fmt: skip

    dry = disaster_recovery_drill(
        params=params.model_copy(update={"dry_run": True}), return_state=True
    )
    assert dry.is_completed(), dry.message
    assert dry.result().outcome is Outcome.PLANNED
    assert env.root(f"SHOW DATABASES LIKE '{env.db}\\_drill\\_%'")[0] == ((stale,),)

    state = disaster_recovery_drill(params=params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.outcome is Outcome.RESOLVED, summary.report
    assert summary.verdict.ok and "orders" in summary.report
    assert env.root(f"SHOW DATABASES LIKE '{env.db}\\_drill\\_%'")[0] == ()  # both dropped

    # the same backup, corrupted: the drill fails and still drops its scratch database
    location = backup_location(env.store, env.block, env.db)
    s3 = env.store.get_s3_client()
    key = f"{location}{backup_id}/{DUMP}"
    body = bytearray(s3.get_object(Bucket=env.store.bucket, Key=key)["Body"].read())
    body[len(body) // 3] ^= 0x01
    s3.put_object(Bucket=env.store.bucket, Key=key, Body=bytes(body))
    failed = disaster_recovery_drill(params=params, return_state=True)
    assert failed.is_failed()
    assert "the drill failed" in failed.message
    assert env.root(f"SHOW DATABASES LIKE '{env.db}\\_drill\\_%'")[0] == ()
