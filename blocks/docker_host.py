"""Docker (or Docker-compatible) engine of a host that runs Compose services."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref

import docker
from docker.constants import DEFAULT_DOCKER_API_VERSION, MINIMUM_DOCKER_API_VERSION
from docker.errors import APIError
from docker.tls import TLSConfig
from docker.utils import version_lt
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr

# Compose's own rule for project names (lowercase letters, digits, dashes and underscores,
# starting with a letter or digit): the value goes into a label filter
_PROJECT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


def normalize_pem(text: str) -> str | None:
    """The PEM blocks of ``text`` with their base64 bodies rewrapped at 64 columns; None when
    it holds none.

    The UI's one-line secret field turns a pasted PEM's line breaks into spaces (or drops
    them); OpenSSL reads neither, so the body is rewrapped, whatever its whitespace.
    """
    blocks = _PEM.findall(text)
    if not blocks:
        return None
    out = []
    for label, body in blocks:
        data = re.sub(r"\s+", "", body)
        if not re.fullmatch(r"[A-Za-z0-9+/=]+", data):
            return None
        lines = [data[i : i + 64] for i in range(0, len(data), 64)]
        out.append("\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]))
    return "\n".join(out) + "\n"


class _TlsClient(docker.DockerClient):
    """A DockerClient whose TLS files (written for the TLS library, which reads only files)
    are removed when it is closed, or at the latest when it is collected."""

    def __init__(self, tls_dir: str, **kwargs) -> None:
        self._cleanup = weakref.finalize(self, shutil.rmtree, tls_dir, True)
        try:
            super().__init__(**kwargs)
        except BaseException:
            self._cleanup()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._cleanup()


class DockerHost(Block):
    """How to reach the Docker Engine API of a host whose Compose services runbooks act on.

    A service on this host is the containers labelled ``com.docker.compose.service=<name>``
    (within ``compose_project`` when set), or else the one container named ``<name>``. Any
    engine that serves the Docker Engine API works: Docker, or podman's
    ``podman system service``.

    Example:
        ```python
        from contextlib import closing
        from blocks.docker_host import DockerHost
        host = DockerHost.load("BLOCK_NAME")
        with closing(host.get_client()) as client:
            names = [c.name for c in client.containers.list()]
        ```
    """

    _block_type_name = "Runbooks Docker Host"
    _block_type_slug = "runbooks-docker-host"
    _description = (
        "Docker Engine API address (unix socket or TCP with TLS), Compose project and timeouts "
        "of a host running Compose services."
    )
    model_config = BLOCK_CONFIG

    base_url: str = Field(
        "unix:///var/run/docker.sock",
        description="Engine API address: unix:///path/to/docker.sock, or tcp://host:2376 "
        "(with TLS) / tcp://host:2375.",
    )
    tls: bool = Field(
        False, description="Talk TLS to a tcp:// engine (dockerd --tlsverify, port 2376)."
    )
    tls_verify: bool = Field(
        True,
        description="Verify the engine's certificate (against tls_ca_cert, else the system's "
        "CAs). Only turn off for test engines.",
    )
    tls_ca_cert: str | None = Field(
        None, description="PEM of the CA that signed the engine's certificate (ca.pem)."
    )
    # the certificate is public (the engine sees it on every connection); only its key is a
    # secret. `runbooks block save` reads one secret per command from stdin, and the two go
    # together: as secrets, cert and key could not be saved in one command
    tls_client_cert: str | None = Field(
        None, description="PEM of the client certificate (cert.pem), for engines that ask one."
    )
    tls_client_key: OptionalSecretStr = Field(
        None, description="PEM of the client certificate's private key (key.pem)."
    )
    compose_project: str | None = Field(
        None,
        description="Only act on containers of this Compose project (label "
        "com.docker.compose.project); empty: any project, as long as a service name is "
        "found in one project only.",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Timeout of every Engine API request, in seconds."
    )
    stop_timeout_s: int = Field(
        10,
        ge=0,
        le=600,
        description="Seconds a container gets to stop (SIGTERM) before SIGKILL, in restarts, "
        "scale-downs and recreations (docker restart -t).",
    )

    @field_validator("base_url")
    @classmethod
    def _engine_address(cls, value: str) -> str:
        if not re.fullmatch(r"(unix://(/[^\s]+)|(tcp|http|https)://[^\s/]+(:\d+)?/?)", value):
            raise ValueError(
                "base_url is unix:///path/to/docker.sock or tcp://host:port (ssh:// is not "
                "supported: forward the socket instead)"
            )
        return value

    @field_validator("compose_project", mode="before")
    @classmethod
    def _project_name(cls, value: str | None) -> str | None:
        if value in ("", None):
            return None
        if not isinstance(value, str) or not _PROJECT.fullmatch(value):
            raise ValueError(
                "compose_project is a Compose project name: lowercase letters, digits, '-' "
                "and '_', starting with a letter or digit"
            )
        return value

    @field_validator("tls_ca_cert", "tls_client_cert")
    @classmethod
    def _certificate_is_pem(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value in ("", None):
            return None
        pem = normalize_pem(value)
        if pem is None:
            raise ValueError(
                f"{info.field_name} is not a PEM certificate (-----BEGIN CERTIFICATE-----)"
            )
        return pem

    @field_validator("tls_client_key")
    @classmethod
    def _key_is_pem(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        pem = normalize_pem(value.get_secret_value())
        if pem is None:
            # the message never quotes the value: it is a secret
            raise ValueError("tls_client_key is not a PEM key (-----BEGIN ... KEY-----)")
        return SecretStr(pem)

    @model_validator(mode="after")
    def _tls_is_whole(self) -> DockerHost:
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError("give both tls_client_cert and tls_client_key, or neither")
        if self.base_url.startswith("unix://") and self.tls:
            raise ValueError("tls applies to tcp:// engines, not to a unix socket")
        return self

    def get_client(self) -> docker.DockerClient:
        """A client of this engine; every request has ``request_timeout_s`` (restarts and
        stops add ``stop_timeout_s``). Close it after use (it may hold TLS key files).

        The API version is the engine's (up to the SDK's own): the SDK's default is newer than
        many engines serve (podman 4 serves 1.41).
        """
        tls, tls_dir = self._tls()
        try:
            options = {
                "base_url": self.base_url,
                "version": self._api_version(tls),
                "timeout": self.request_timeout_s,
            }
            if tls_dir is None:
                return docker.DockerClient(**options)
            return _no_ca_bundle_from_environment(_TlsClient(tls_dir, tls=tls, **options))
        except BaseException:
            if tls_dir is not None:
                shutil.rmtree(tls_dir, ignore_errors=True)
            raise

    def _tls(self) -> tuple[TLSConfig | None, str | None]:
        if not self.tls:
            return None, None
        # the TLS library loads certificates and keys only from files: written to a private
        # directory that lives as long as the client
        tls_dir = tempfile.mkdtemp(prefix="runbooks-docker-tls-")
        client_cert = None
        if self.tls_client_cert is not None and self.tls_client_key is not None:
            client_cert = (
                _private_file(tls_dir, "cert.pem", self.tls_client_cert),
                _private_file(tls_dir, "key.pem", self.tls_client_key.get_secret_value()),
            )
        ca = _private_file(tls_dir, "ca.pem", self.tls_ca_cert) if self.tls_ca_cert else None
        # without a CA, verification uses the system's CAs; the SDK makes tcp:// https://
        return TLSConfig(client_cert=client_cert, ca_cert=ca, verify=self.tls_verify), tls_dir

    def _api_version(self, tls: TLSConfig | None) -> str:
        """The engine's API version, from the ``Api-Version`` header of ``GET /_ping``.

        Not the SDK's ``version="auto"``: that asks ``/version``, which podman answers by
        running conmon and runc for their versions (0.4-0.6 s a client here, ~3 ms for a ping).
        """
        probe = docker.DockerClient(
            base_url=self.base_url,
            version=MINIMUM_DOCKER_API_VERSION,
            timeout=self.request_timeout_s,
            tls=tls or False,
        )
        if tls is not None:
            _no_ca_bundle_from_environment(probe)
        try:
            response = probe.api.get(f"{probe.api.base_url}/_ping", timeout=self.request_timeout_s)
            if response.status_code >= 400:
                raise APIError(f"ping: {response.text[:200]}", response=response)
            served = response.headers.get("Api-Version") or probe.version()["ApiVersion"]
        finally:
            probe.close()
        return (
            served if version_lt(served, DEFAULT_DOCKER_API_VERSION) else DEFAULT_DOCKER_API_VERSION
        )


def _no_ca_bundle_from_environment(client: docker.DockerClient) -> docker.DockerClient:
    """Make the block's TLS settings apply whatever the environment says.

    requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (set on many hosts, and here) override
    a session's CA and its verify=False (psf/requests#3829, open): the engine's CA would be
    ignored and its certificate refused. The price: HTTP(S)_PROXY does not apply to a TLS
    engine's connection either (it is made directly).
    """
    client.api.trust_env = False
    return client


def _private_file(directory: str, name: str, content: str) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    return path
