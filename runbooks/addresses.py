"""One address per server, whatever name a block uses for it (``localhost``, ``127.0.0.1``, DNS)."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterable


def canonical_address(addresses: Iterable[str]) -> str:
    """The one address that stands for a host among those its name resolves to.

    The lowest IPv4 address, else the lowest IPv6 one: ``localhost`` (``::1`` and
    ``127.0.0.1``) and ``127.0.0.1`` agree, and a name with several records always picks the
    same one. IPv4-mapped IPv6 addresses count as IPv4.
    """
    ips = []
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        ips.append(ip)
    if not ips:
        raise ValueError("no address to choose from")
    return str(min(ips, key=lambda ip: (ip.version, ip)))


def resolve_host(host: str, port: int, timeout_s: float) -> str:
    """``host``'s canonical address; raises ``TimeoutError`` past ``timeout_s``, or
    ``socket.gaierror`` when the name does not resolve.

    ``getaddrinfo`` has no timeout of its own (the system resolver may wait far longer), so it
    runs in a daemon thread that is left behind if it overstays.
    """
    answer: list[list[str]] = []
    error: list[BaseException] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            answer.append([str(info[4][0]) for info in infos])
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if error:
        raise error[0]
    if not answer:
        raise TimeoutError(f"resolving {host!r} took longer than {timeout_s:g}s")
    return canonical_address(answer[0])
