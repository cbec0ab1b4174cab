"""Small S3 object helpers every S3 user shares (Kafka topic backups, database backups, the event
archive): listing a prefix, reading and writing JSON objects."""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError
from pydantic import BaseModel


def list_objects(s3: Any, bucket: str, prefix: str) -> dict[str, int]:
    """Every object below ``prefix``: key relative to it -> size."""
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) :]] = obj["Size"]
    return out


def get_json(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    return json.loads(body)


def put_json(s3: Any, bucket: str, key: str, model: BaseModel) -> None:
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=model.model_dump_json(indent=1).encode(),
        ContentType="application/json",
    )
