"""`runbooks block save` / `list` as a user runs them, against a real Prefect server: the block
lands on that server (not on a temporary one), fields are validated by the block's model, and
a secret is read from a pipe or a prompt without echo and never printed."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
import uuid
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from blocks.event_store import EventStore
from blocks.flink import FlinkCluster
from blocks.kubernetes import KubernetesCluster
from blocks.postgres import PostgresDatabase
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "pw-" + uuid.uuid4().hex
KUBECONFIG = f"""apiVersion: v1
clusters:
- cluster: {{server: 'https://k8s.example:6443'}}
  name: c
contexts:
- context: {{cluster: c, user: u}}
  name: c
current-context: c
users:
- name: u
  user: {{token: {SECRET}}}
"""


def _name() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # no PREFECT_* from the test process: the command finds its server by itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), **extra)
    return env


def runbooks(
    *argv: str, tmp_path: Path, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(tmp_path, **env),
        timeout=120,
    )


def test_save_with_password_from_stdin_then_list(tmp_path: Path) -> None:
    name = _name()
    api = PREFECT_API_URL.value()
    saved = runbooks(
        "block", "save", "postgres-database", name, "--host", "db.example", "--port", "6432",
        "--dbname", "orders", "--user", "runbooks", "--password-stdin", "--api-url", api,
        stdin=SECRET + "\n", tmp_path=tmp_path,
    )  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    assert f"saved runbooks-postgres-database/{name} to {api}" in saved.stdout
    assert SECRET not in saved.stdout + saved.stderr

    block = PostgresDatabase.load(name)
    assert (block.host, block.port, block.dbname, block.user) == (
        "db.example",
        6432,
        "orders",
        "runbooks",
    )
    assert block.password is not None and block.password.get_secret_value() == SECRET

    # PREFECT_API_URL instead of --api-url
    listed = runbooks("block", "list", tmp_path=tmp_path, PREFECT_API_URL=api)
    assert listed.returncode == 0, listed.stderr
    assert f"runbooks-postgres-database/{name}" in listed.stdout.splitlines()
    assert SECRET not in listed.stdout + listed.stderr


def test_secret_prompt_does_not_echo(tmp_path: Path) -> None:
    """On a terminal the secret is prompted for (getpass): typed characters are not echoed."""
    name = _name()
    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "block", "save", "flink-cluster", name,
         "--rest-url", "http://flink.example:8081", "--username", "ops", "--password-stdin",
         "--api-url", PREFECT_API_URL.value()],
        stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=_env(tmp_path),
        preexec_fn=controlling_terminal,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    try:
        seen += _read_until(master, b"password: ", timeout_s=90)
        os.write(master, SECRET.encode() + b"\n")
        seen += _read_until(master, None, timeout_s=90)
        assert proc.wait(timeout=30) == 0, seen.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    output = seen.decode(errors="replace")
    assert f"saved runbooks-flink-cluster/{name}" in output
    assert SECRET not in output, "the terminal echoed the secret"

    block = FlinkCluster.load(name)
    assert block.username == "ops"
    assert block.password is not None and block.password.get_secret_value() == SECRET


def _read_until(fd: int, marker: bytes | None, timeout_s: float) -> bytes:
    """Terminal output until `marker` (or, for None, until the program closes the terminal)."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the program exited and closed the terminal
            chunk = b""
        if not chunk:
            assert marker is None, f"closed before {marker!r}: {data!r}"
            return data
        data += chunk
        if marker is not None and marker in data:
            return data
    raise AssertionError(f"no {marker!r} after {timeout_s}s: {data!r}")


def test_invalid_fields_are_refused_without_repeating_the_secret(tmp_path: Path) -> None:
    name = _name()
    # basic auth needs a username too: FlinkCluster's own validator says so
    refused = runbooks(
        "block", "save", "flink-cluster", name, "--rest-url", "http://flink.example:8081",
        "--password-stdin", "--api-url", PREFECT_API_URL.value(),
        stdin=SECRET, tmp_path=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "basic auth needs both username and password" in refused.stderr
    assert SECRET not in refused.stdout + refused.stderr
    with pytest.raises(ValueError):
        FlinkCluster.load(name)

    missing = runbooks(
        "block", "save", "postgres-database", name, "--api-url", PREFECT_API_URL.value(),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 1
    assert "host (--host): Field required" in missing.stderr
    assert "user (--user): Field required" in missing.stderr


def test_no_server_is_an_error_not_a_temporary_server(tmp_path: Path) -> None:
    """Block.save() without PREFECT_API_URL goes to a throwaway server; the command refuses."""
    nothing = f"http://127.0.0.1:{free_port()}/api"
    result = runbooks(
        "block", "save", "postgres-database", _name(), "--host", "h", "--user", "u",
        "--api-url", nothing, tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"no Prefect server answers at {nothing}" in result.stderr
    assert "temporary server" not in result.stdout + result.stderr


def test_overwrite_nested_block_and_multiline_secret(tmp_path: Path) -> None:
    name = _name()
    api = PREFECT_API_URL.value()
    first = runbooks(
        "block", "save", "postgres-database", name, "--host", "db-1", "--user", "u",
        "--api-url", api, tmp_path=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    again = runbooks(
        "block", "save", "postgres-database", name, "--host", "db-2", "--user", "u",
        "--api-url", api, tmp_path=tmp_path,
    )  # fmt: skip
    assert again.returncode == 1
    assert "exists; pass --overwrite" in again.stderr
    assert PostgresDatabase.load(name).host == "db-1"
    replaced = runbooks(
        "block", "save", "postgres-database", name, "--host", "db-2", "--user", "u",
        "--overwrite", "--api-url", api, tmp_path=tmp_path,
    )  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    assert PostgresDatabase.load(name).host == "db-2"

    # a nested block by the name it was saved under
    store = runbooks(
        "block", "save", "event-store", name, "--database", name, "--table", "orders_events",
        "--api-url", api, tmp_path=tmp_path,
    )  # fmt: skip
    assert store.returncode == 0, store.stderr
    loaded = EventStore.load(name)
    assert (loaded.database.host, loaded.table) == ("db-2", "orders_events")
    unknown = runbooks(
        "block", "save", "event-store", name, "--database", "no-such-block", "--overwrite",
        "--api-url", api, tmp_path=tmp_path,
    )  # fmt: skip
    assert unknown.returncode == 1
    assert "no saved runbooks-postgres-database block named 'no-such-block'" in unknown.stderr

    # a YAML kubeconfig keeps its line breaks through stdin
    kube = runbooks(
        "block", "save", "kubernetes-cluster", name, "--kubeconfig-stdin", "--api-url", api,
        stdin=KUBECONFIG, tmp_path=tmp_path,
    )  # fmt: skip
    assert kube.returncode == 0, kube.stderr
    assert SECRET not in kube.stdout + kube.stderr
    cluster = KubernetesCluster.load(name)
    assert cluster.kubeconfig is not None
    assert cluster.kubeconfig.get_secret_value() == KUBECONFIG.rstrip("\n")
