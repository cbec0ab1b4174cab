"""Kafka topic backups in S3: listing backups, reading and writing their JSON objects.

The format is in tasks.kafka_backup_format; backing up in tasks.kafka_backup, restoring in
tasks.kafka_restore.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from blocks.backup_store import BackupStore
from tasks.kafka_backup_format import MANIFEST, PLAN, BackupPlan, Manifest, backup_root
from tasks.s3_objects import get_json, list_objects, put_json

__all__ = ["BackupRef", "get_json", "list_backups", "list_objects", "load_manifest", "put_json"]


class BackupRef(BaseModel):
    backup_id: str
    complete: bool
    plan: BackupPlan | None


def list_backups(store: BackupStore, topic: str, s3: Any = None) -> list[BackupRef]:
    """The backups of ``topic`` in the store, oldest first (ids sort by time)."""
    s3 = s3 or store.get_s3_client()
    top = backup_root(store.prefix, topic, "x")[:-2]  # <prefix>/<topic>/
    ids: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=top, Delimiter="/"
    ):
        ids += [cp["Prefix"][len(top) :].rstrip("/") for cp in page.get("CommonPrefixes", [])]
    refs = []
    for backup_id in sorted(ids):
        root = backup_root(store.prefix, topic, backup_id)
        listed = s3.list_objects_v2(Bucket=store.bucket, Prefix=root, Delimiter="/")
        names = {o["Key"][len(root) :] for o in listed.get("Contents", [])}
        plan = get_json(s3, store.bucket, root + PLAN) if PLAN in names else None
        refs.append(
            BackupRef(
                backup_id=backup_id,
                complete=MANIFEST in names,
                plan=BackupPlan.model_validate(plan) if plan else None,
            )
        )
    return refs


def load_manifest(
    store: BackupStore, topic: str, backup_id: str | None, s3: Any = None
) -> Manifest:
    """The manifest of ``backup_id``, or of the newest complete backup of ``topic``."""
    s3 = s3 or store.get_s3_client()  # a client costs ~0.3 s to build: one per task
    if backup_id is None:
        complete = [b.backup_id for b in list_backups(store, topic, s3) if b.complete]
        if not complete:
            raise FileNotFoundError(
                f"no complete backup of {topic} in s3://{store.bucket}/{store.prefix}"
            )
        backup_id = complete[-1]
    root = backup_root(store.prefix, topic, backup_id)
    raw = get_json(s3, store.bucket, root + MANIFEST)
    if raw is None:
        raise FileNotFoundError(f"backup s3://{store.bucket}/{root} has no manifest: incomplete")
    return Manifest.model_validate(raw)
