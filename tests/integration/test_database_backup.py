"""database-backup and disaster-recovery-drill against a real PostgreSQL and a real moto S3.

The module's own database holds three tables of every common column type; a writer keeps inserting
while the backup runs, so the manifest's counts must be those of the dump's snapshot, not of the
moment the counts were read. The drill restores into a real scratch database, compares, drops it.
The runbook logs in as a role with pg_read_all_data and CREATEDB only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from prefect.settings import PREFECT_API_URL
from psycopg import sql

from blocks.backup_store import BackupStore
from blocks.postgres import PostgresDatabase
from deployments.catalog import PROJECT_ROOT
from flows.postgres.database_backup import DatabaseBackupParams, database_backup
from flows.postgres.disaster_recovery_drill import DrillParams, disaster_recovery_drill
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.db_backup_format import DUMP, MANIFEST, scratch_comment
from tests.conftest import read_incident_report, read_run_logs, unique
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tests.receivers import HttpReceiver
from tests.servers import PostgresServer

pytestmark = pytest.mark.integration

TABLES = ["public.events", "public.devices", "audit.logins"]


@dataclass
class Env:
    server: PostgresServer
    admin: psycopg.Connection  # superuser, in the module's database
    db: str
    role: str
    password: str
    store_block: str
    db_block: str
    store: BackupStore

    def s3(self):
        return self.store.get_s3_client()

    def count(self, table: str) -> int:
        schema, name = table.split(".")
        return self.admin.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name))
        ).fetchone()[0]

    def count_in(self, database: str, table: str) -> int:
        schema, name = table.split(".")
        with psycopg.connect(self.server.conninfo(dbname=database)) as conn:
            return conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name))
            ).fetchone()[0]

    def databases(self) -> set[str]:
        return {r[0] for r in self.admin.execute("SELECT datname FROM pg_database").fetchall()}

    def keys(self) -> list[str]:
        listed = self.s3().list_objects_v2(Bucket=self.store.bucket, Prefix=self.store.prefix)
        return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.fixture(scope="module")
def env(postgres: PostgresServer, moto: MotoServer) -> Iterator[Env]:
    suffix = uuid.uuid4().hex[:8]
    db, role, password = f"rbbackup_{suffix}", f"rbbackupop_{suffix}", f"pw-{uuid.uuid4().hex}"
    root = psycopg.connect(postgres.conninfo(), autocommit=True)
    root.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    root.execute(
        sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)
        )
    )
    root.execute(sql.SQL("GRANT pg_read_all_data TO {}").format(sql.Identifier(role)))
    admin = psycopg.connect(postgres.conninfo(dbname=db), autocommit=True)
    admin.execute(
        """
        CREATE SCHEMA audit;
        CREATE TABLE events (id bigserial PRIMARY KEY, status text NOT NULL, payload jsonb,
            created_at timestamptz NOT NULL DEFAULT now(), amount float8, blob bytea,
            tags text[], window_len interval);
        CREATE TABLE devices (token text PRIMARY KEY, platform text, last_seen date);
        CREATE TABLE audit.logins (at timestamptz, who text, ok boolean, ip inet);
        INSERT INTO events (status, payload, amount, blob, tags, window_len, created_at)
            SELECT (ARRAY['PENDING','PROCESSING','COMPLETED','FAILED'])[1 + i % 4],
                   jsonb_build_object('match', i, 'note', repeat('x', i % 50)),
                   i / 7.0, decode(md5(i::text), 'hex'), ARRAY['a' || i, NULL],
                   make_interval(secs => i), now() - make_interval(mins => i)
            FROM generate_series(1, 20000) i;
        INSERT INTO devices SELECT 'tok-' || i, CASE WHEN i % 2 = 0 THEN 'fcm' ELSE 'apns' END,
            date '2026-01-01' + (i % 300) FROM generate_series(1, 3000) i;
        INSERT INTO audit.logins SELECT now() - make_interval(hours => i), 'user' || (i % 9),
            i % 5 <> 0, ('10.0.' || (i % 250) || '.' || (i % 200))::inet
            FROM generate_series(1, 500) i;
        """
    )
    bucket = f"db-backups-{suffix}"
    moto.client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": moto.region}
    )
    store = BackupStore(
        bucket=bucket,
        prefix="database-backups",
        endpoint_url=moto.endpoint_url,
        region=moto.region,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        timeout_s=10,
    )
    store_block, db_block = unique("db-backups"), unique("backup-db")
    store.save(store_block, overwrite=True)
    PostgresDatabase(
        host=postgres.host,
        port=postgres.port,
        dbname=db,
        user=role,
        password=password,
        connect_timeout_s=5,
        statement_timeout_s=10,
    ).save(db_block, overwrite=True)
    yield Env(postgres, admin, db, role, password, store_block, db_block, store)
    admin.close()
    for name in [
        r[0]
        for r in root.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{db}%",)
        ).fetchall()
    ]:
        root.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    root.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    root.close()


def backup_params(env: Env, **overrides) -> DatabaseBackupParams:
    fields = {
        "db_block": env.db_block,
        "backup_store_block": env.store_block,
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    return DatabaseBackupParams(**(fields | overrides))


def drill_params(env: Env, **overrides) -> DrillParams:
    fields = {
        "db_block": env.db_block,
        "backup_store_block": env.store_block,
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    return DrillParams(**(fields | overrides))


class Writer(threading.Thread):
    """Inserts events one transaction at a time until stopped."""

    def __init__(self, env: Env):
        super().__init__(daemon=True)
        self.conninfo = env.server.conninfo(dbname=env.db)
        self.stop = threading.Event()
        self.inserted = 0

    def run(self) -> None:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            while not self.stop.is_set():
                conn.execute("INSERT INTO events (status, amount) VALUES ('PENDING', 1.5)")
                self.inserted += 1


def test_backup_while_writing_then_drill_restores_equal_tables(env: Env) -> None:
    writer = Writer(env)
    writer.start()
    try:
        state = database_backup(params=backup_params(env), return_state=True)
    finally:
        writer.stop.set()
        writer.join(10)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    manifest = summary.manifest
    assert writer.inserted > 0
    assert set(manifest.tables) == set(TABLES)
    # the counts are the dump snapshot's: the writer added rows before and after it
    assert 20000 <= manifest.tables["public.events"].rows < env.count("public.events")
    assert manifest.tables["public.devices"].rows == 3000
    assert all(t.checksum for t in manifest.tables.values())

    # the object in S3 is what the manifest says, byte for byte
    s3 = env.s3()
    root = summary.location.removeprefix(f"s3://{env.store.bucket}/")
    body = s3.get_object(Bucket=env.store.bucket, Key=root + DUMP)["Body"].read()
    assert len(body) == manifest.size and hashlib.sha256(body).hexdigest() == manifest.sha256
    assert body[:5] == b"PGDMP"  # pg_dump's custom format
    stored = json.loads(s3.get_object(Bucket=env.store.bucket, Key=root + MANIFEST)["Body"].read())
    assert stored["sha256"] == manifest.sha256

    before = env.databases()
    state = disaster_recovery_drill(params=drill_params(env), return_state=True)
    assert state.is_completed(), state.message
    drill = state.result()
    assert drill.outcome is Outcome.RESOLVED
    assert drill.backup_id == summary.backup_id
    assert drill.verdict.ok and drill.restore_seconds > 0
    assert env.databases() == before, "the scratch database was dropped"
    report = read_incident_report(state.state_details.flow_run_id)
    assert "match the backup" in report and "recovery time objective" in report


def test_dry_runs_write_and_create_nothing(env: Env) -> None:
    database_backup(params=backup_params(env))  # something for the drill to plan with
    keys = env.keys()
    state = database_backup(params=backup_params(env, dry_run=True), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.PLANNED
    assert env.keys() == keys

    before = env.databases()
    state = disaster_recovery_drill(params=drill_params(env, dry_run=True), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.PLANNED
    assert env.databases() == before


def test_retention_keeps_the_newest_complete_backups(env: Env) -> None:
    # an incomplete backup of a run that died two days ago (no manifest)
    location = f"{env.store.prefix}/postgres/{env.server.host}_{env.server.port}/{env.db}/"
    dead = "20200101T000000Z-deadbeef"
    env.s3().put_object(Bucket=env.store.bucket, Key=f"{location}{dead}/{DUMP}", Body=b"PGDMP...")
    ids = []
    for _ in range(3):
        ids.append(database_backup(params=backup_params(env, keep_last=2)).backup_id)
    complete = {k.split("/")[-2] for k in env.keys() if k.endswith(MANIFEST)}
    assert set(ids[-2:]) <= complete and ids[0] not in complete
    assert not any(dead in k for k in env.keys()), "the dead run's leftovers are gone"
    assert not any(ids[0] in k for k in env.keys())


@pytest.mark.parametrize("jobs", [1, 2], ids=["streamed", "spooled"])
def test_corrupted_backup_fails_the_drill_with_the_reason(env: Env, jobs: int) -> None:
    summary = database_backup(params=backup_params(env))
    root = summary.location.removeprefix(f"s3://{env.store.bucket}/")
    s3 = env.s3()
    body = bytearray(s3.get_object(Bucket=env.store.bucket, Key=root + DUMP)["Body"].read())
    for i in range(len(body) // 2, len(body) // 2 + 64):
        body[i] ^= 0xFF  # flip bytes in the middle: inside compressed table data
    s3.put_object(Bucket=env.store.bucket, Key=root + DUMP, Body=bytes(body))
    before = env.databases()

    state = disaster_recovery_drill(
        params=drill_params(env, backup_id=summary.backup_id, restore_jobs=jobs), return_state=True
    )

    assert state.is_failed()
    assert "corrupted" in state.message and summary.backup_id in state.message
    assert env.databases() == before, "the half-restored scratch database was dropped"


def test_drill_drops_a_scratch_database_left_by_a_dead_drill(env: Env) -> None:
    database_backup(params=backup_params(env))
    left = f"{env.db}_drill_0badc0de"
    with psycopg.connect(
        env.server.conninfo(dbname=env.db, user=env.role, password=env.password), autocommit=True
    ) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(left)))
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(left), sql.Literal(scratch_comment("0badc0de-dead"))
            )
        )
    unrelated = f"{env.db}_keep"
    env.admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(unrelated)))

    state = disaster_recovery_drill(params=drill_params(env), return_state=True)

    assert state.is_completed(), state.message
    assert left not in env.databases()
    assert unrelated in env.databases()


def test_a_drill_killed_mid_restore_leaves_a_scratch_database_the_next_drill_drops(env: Env) -> None:
    database_backup(params=backup_params(env))
    before = env.databases()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.db_drill_victim", env.db_block, env.store_block],
        cwd=PROJECT_ROOT,
        capture_output=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PREFECT_API_URL": PREFECT_API_URL.value()},
    )
    assert proc.returncode == -9, f"victim did not die by SIGKILL: {proc.returncode} {proc.stderr[-2000:]!r}"
    (left,) = env.databases() - before  # restored, never compared nor dropped
    assert left.startswith(f"{env.db}_drill_")
    assert env.count_in(left, "public.devices") == 3000

    # the next drill takes the dead run's lock (its process is gone), drops the leftover, drills
    state = disaster_recovery_drill(params=drill_params(env), return_state=True)

    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.RESOLVED
    assert env.databases() == before
    report = read_incident_report(state.state_details.flow_run_id)
    assert left in report and "left by earlier drills" in report


def test_password_is_in_no_log_or_report(env: Env) -> None:
    state = database_backup(params=backup_params(env), return_state=True)
    run_id = state.state_details.flow_run_id
    text = read_incident_report(run_id) + json.dumps(read_run_logs(run_id))
    assert env.password not in text


def test_pushes_the_backup_time_to_the_pushgateway(env: Env) -> None:
    with HttpReceiver() as gateway:
        summary = database_backup(params=backup_params(env, pushgateway_url=gateway.url))
    (req,) = [r for r in gateway.requests if r.method in ("PUT", "POST")]
    assert "/metrics/job/runbooks-database-backup" in req.path
    assert b"runbooks_database_backup_last_success_timestamp_seconds" in req.body
    # the exposition format writes floats: 1004661 is "1.004661e+06"
    sizes = [
        float(line.split()[-1])
        for line in req.body.decode().splitlines()
        if line.startswith("runbooks_database_backup_size_bytes")
    ]
    assert sizes == [summary.manifest.size]


def test_a_database_label_that_is_not_a_name_is_refused() -> None:
    with pytest.raises(ValueError, match="not a database name"):
        DatabaseBackupParams(database="x; DROP DATABASE prod")
    with pytest.raises(ValueError, match="not a backup id"):
        DrillParams(backup_id="../../etc")
