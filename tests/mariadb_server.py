"""A throwaway MariaDB server (mariadb-install-db + mariadbd) on a free port.

The admin (root, no password) reaches it through the unix socket in its data directory; the
runbook and the test's application users log in over TCP like a remote client would.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pymysql

from tests.servers import free_port


@dataclass
class MariaDBServer:
    port: int
    datadir: Path
    proc: subprocess.Popen | None = None
    host: str = "127.0.0.1"

    @property
    def socket(self) -> str:
        return str(self.datadir / "sock")

    @property
    def log_path(self) -> Path:
        return self.datadir.parent / "mariadbd.log"

    def admin(self, database: str | None = None) -> pymysql.connections.Connection:
        """A root session (autocommit) through the unix socket."""
        return pymysql.connect(
            unix_socket=self.socket,
            user="root",
            database=database,
            autocommit=True,
            connect_timeout=5,
            read_timeout=60,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_mariadb(timeout_s: float = 60.0) -> MariaDBServer:
    base = Path(tempfile.mkdtemp(prefix="runbooks-mariadb-"))
    datadir = base / "data"
    subprocess.run(
        [
            "mariadb-install-db",
            "--no-defaults",
            "--user=root",
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = MariaDBServer(port=free_port(), datadir=datadir)
    with server.log_path.open("wb") as log:
        server.proc = subprocess.Popen(
            [
                "mariadbd",
                "--no-defaults",
                "--user=root",
                f"--datadir={datadir}",
                f"--port={server.port}",
                "--bind-address=127.0.0.1",
                f"--socket={server.socket}",
                f"--pid-file={datadir / 'pid'}",
                "--innodb-buffer-pool-size=32M",
                "--skip-log-bin",
                # tests make throwaway tables: no need to survive a power cut
                "--innodb-flush-log-at-trx-commit=0",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout_s
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"mariadbd exited: {server.log_path.read_text()[-2000:]}")
        try:
            server.admin().close()
            return server
        except pymysql.err.OperationalError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.1)
