"""Streaming a process's output into one S3 object: multipart, parts put on worker threads, the
sha256 and size of the whole computed on the way (database-backup's dumps)."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

from botocore.exceptions import BotoCoreError, ClientError

PART_BYTES = 16 * 1024 * 1024  # S3 parts: at least 5 MiB; 16 MiB keeps 1 GB under 70 parts
UPLOAD_THREADS = 3


class MultipartUpload:
    """Parts read from a stream, put on worker threads; sha256 and size of the whole."""

    def __init__(self, s3: Any, bucket: str, key: str):
        self.s3, self.bucket, self.key = s3, bucket, key
        self.upload_id: str | None = None
        self.sha = hashlib.sha256()
        self.size = 0
        self.pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="dump-part")
        self.parts: list[Future[dict[str, Any]]] = []

    def feed(self, stream: IO[bytes]) -> None:
        number = 0
        while True:
            chunk = _read_full(stream, PART_BYTES)
            if not chunk:
                break
            self.sha.update(chunk)
            self.size += len(chunk)
            number += 1
            if number == 1 and len(chunk) < PART_BYTES:
                # small dump: one plain PUT
                self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=chunk)
                return
            if self.upload_id is None:
                self.upload_id = self.s3.create_multipart_upload(Bucket=self.bucket, Key=self.key)[
                    "UploadId"
                ]
            while sum(not f.done() for f in self.parts) >= UPLOAD_THREADS * 2:
                time.sleep(0.01)  # at most this many parts in memory
            self.parts.append(self.pool.submit(self._put, number, chunk))
        if number == 0:
            self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=b"")

    def _put(self, number: int, body: bytes) -> dict[str, Any]:
        r = self.s3.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body
        )
        return {"PartNumber": number, "ETag": r["ETag"]}

    def feed_process(self, proc: subprocess.Popen, wrap: Callable[[IO[bytes]], Any] | None = None) -> int:
        """Upload ``proc``'s standard output (through ``wrap``, e.g. a compressor) and wait for it
        to exit; its exit status. The upload is aborted when it fails or exits non-zero."""
        try:
            stdout = proc.stdout
            assert stdout is not None
            self.feed(wrap(stdout) if wrap else stdout)
            rc = proc.wait(timeout=60)
        except BaseException:
            proc.kill()
            proc.wait()
            self.abort()
            raise
        if rc != 0:
            self.abort()
        return rc

    def complete(self) -> None:
        """Finish the upload, and check that S3 holds as many bytes as were sent."""
        try:
            if self.upload_id is not None:
                parts = [f.result() for f in self.parts]
                self.s3.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts},
                )
        finally:
            self.pool.shutdown(wait=True)
        stored = self.s3.head_object(Bucket=self.bucket, Key=self.key)["ContentLength"]
        if stored != self.size:
            raise RuntimeError(f"the object has {stored} bytes in S3, {self.size} were sent")

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.upload_id is not None:
            try:
                self.s3.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
                )
            except (BotoCoreError, ClientError):
                pass  # S3 lifecycle rules clean up what is left


def _read_full(stream: IO[bytes], n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)

