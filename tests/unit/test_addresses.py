"""One address per host, whatever name a block uses (issue #9 defect 4)."""

from __future__ import annotations

import pytest

from runbooks.addresses import canonical_address, resolve_host


@pytest.mark.parametrize(
    ("addresses", "chosen"),
    [
        (["127.0.0.1"], "127.0.0.1"),
        # what `localhost` resolves to, in either order
        (["::1", "127.0.0.1"], "127.0.0.1"),
        (["127.0.0.1", "::1"], "127.0.0.1"),
        # round-robin records: always the same one, compared as numbers, not text
        (["10.0.0.9", "10.0.0.10", "10.0.0.9"], "10.0.0.9"),
        (["10.0.0.10", "9.255.255.255"], "9.255.255.255"),
        (["::ffff:10.0.0.5"], "10.0.0.5"),
        (["2001:db8::2", "2001:db8::1"], "2001:db8::1"),
        (["fe80::1%eth0"], "fe80::1"),
    ],
)
def test_canonical_address(addresses: list[str], chosen: str) -> None:
    assert canonical_address(addresses) == chosen


def test_no_address_is_an_error() -> None:
    with pytest.raises(ValueError):
        canonical_address([])


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_localhost_and_its_address_resolve_alike(host: str) -> None:
    assert resolve_host(host, 8081, timeout_s=5) == "127.0.0.1"
