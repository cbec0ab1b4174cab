"""A TLS front for a unix socket: what ``dockerd --tlsverify -H tcp://...:2376`` offers, for
an engine (podman 4) that serves its API on a unix socket only.

Certificates are made for each proxy: a CA, a server certificate for 127.0.0.1 and a client
certificate, all signed by the CA. With ``require_client_cert`` the proxy refuses clients
without a certificate of that CA, as dockerd --tlsverify does.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.servers import free_port


def _pem(obj) -> str:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM).decode()
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _certificate(subject: str, key, issuer: x509.Name | None, issuer_key, *, ca: bool = False,
                 server: bool = False) -> x509.Certificate:  # fmt: skip
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class TestPki:
    ca: Path
    server_cert: Path
    server_key: Path


def write_test_pki(directory: Path) -> TestPki:
    """A CA and a server certificate for 127.0.0.1 signed by it, as PEM files in ``directory``
    (for servers that speak TLS themselves, e.g. redis-server --tls-port)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("runbooks test CA", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("127.0.0.1", server_key, ca.subject, ca_key, server=True)
    pki = TestPki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca.write_text(_pem(ca))
    pki.server_cert.write_text(_pem(server))
    pki.server_key.write_text(_pem(server_key))
    pki.server_key.chmod(0o600)
    return pki


@dataclass
class TlsProxy:
    """TLS on 127.0.0.1:<port> in front of ``unix_socket``."""

    unix_socket: str
    require_client_cert: bool = True
    port: int = field(default_factory=free_port)
    ca_pem: str = ""
    client_cert_pem: str = ""
    client_key_pem: str = ""
    _listener: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> TlsProxy:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("runbooks test CA", ca_key, None, ca_key, ca=True)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = _certificate("127.0.0.1", server_key, ca.subject, ca_key, server=True)
        client_key = ec.generate_private_key(ec.SECP256R1())
        client = _certificate("runbooks", client_key, ca.subject, ca_key)
        self.ca_pem, self.client_cert_pem = _pem(ca), _pem(client)
        self.client_key_pem = _pem(client_key)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "server.pem").write_text(_pem(server) + _pem(server_key))
            context.load_cert_chain(Path(tmp, "server.pem"))
        context.load_verify_locations(cadata=self.ca_pem)
        context.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_NONE
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, args=(context,), daemon=True).start()
        return self

    def _accept(self, context: ssl.SSLContext) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(context, raw), daemon=True).start()

    def _serve(self, context: ssl.SSLContext, raw: socket.socket) -> None:
        with contextlib.suppress(OSError), raw:
            raw.settimeout(10)
            with (
                context.wrap_socket(raw, server_side=True) as tls,
                socket.socket(socket.AF_UNIX) as engine,
            ):
                engine.connect(self.unix_socket)
                pump = threading.Thread(target=copy_stream, args=(engine, tls), daemon=True)
                pump.start()
                copy_stream(tls, engine)
                pump.join(10)

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()


def copy_stream(source: socket.socket, target: socket.socket) -> None:
    """Bytes from source to target until source ends; then target's write side is shut."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)
