"""A throwaway moto server (fake AWS APIs, its own process) on a free port.

Started as ``python -m moto.server``; SNS delivers to SQS inside it, so a test can read a
published message back through a queue subscribed to the topic.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import boto3
import httpx

from tests.servers import free_port

REGION = "eu-west-1"
ACCESS_KEY_ID = "testing-key-id"
SECRET_ACCESS_KEY = "testing-secret-key"


@dataclass
class MotoServer:
    port: int = field(default_factory=free_port)
    region: str = REGION
    _proc: subprocess.Popen | None = None
    # werkzeug logs every request to stderr: a pipe nobody reads fills up after a few hundred
    # requests and the server hangs in its log write; a file never blocks
    _log: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> MotoServer:
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                raise RuntimeError(
                    f"moto server exited with {self._proc.returncode}: {err[-2000:]}"
                )
            try:
                if httpx.get(f"{self.endpoint_url}/moto-api/", timeout=1).status_code < 500:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"moto server not up on port {self.port} after {timeout_s}s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def topic_with_queue(self, prefix: str = "escalations") -> tuple[str, str]:
        """A new SNS topic with a new SQS queue subscribed to it: (topic ARN, queue URL)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        sns, sqs = self.client("sns"), self.client("sqs")
        topic_arn = sns.create_topic(Name=name)["TopicArn"]
        queue_url = sqs.create_queue(QueueName=name)["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
        return topic_arn, queue_url

    def read_sns_notifications(
        self, queue_url: str, count: int = 1, timeout_s: float = 10.0
    ) -> list[dict[str, Any]]:
        """SNS notification envelopes (Subject, Message, MessageAttributes, ...) from the queue."""
        sqs = self.client("sqs")
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            resp = sqs.receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            )
            for msg in resp.get("Messages", []):
                found.append(json.loads(msg["Body"]))
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=msg["ReceiptHandle"])
        if len(found) < count:
            raise TimeoutError(f"{len(found)} of {count} SNS notifications arrived in {timeout_s}s")
        return found

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
