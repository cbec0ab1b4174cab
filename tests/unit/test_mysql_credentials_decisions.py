"""Pure helpers of the MariaDB rotation and backups: the native password hash (what the server's
PASSWORD() returns) and identifier quoting."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from tasks.mysql_backup import fingerprint_query, quote_ident
from tasks.mysql_credentials import native_password_hash

HASHES = [
    # MariaDB / MySQL: SELECT PASSWORD('password')
    ("password", "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"),
    ("mariadb", "*54958E764CE10E50764C2EECBB71D01F08549980"),
]


@pytest.mark.parametrize(("password", "expected"), HASHES)
def test_native_password_hash(password: str, expected: str) -> None:
    assert native_password_hash(SecretStr(password)) == expected


IDENTS = [
    ("orders", "`orders`"),
    ("rb_db$1", "`rb_db$1`"),
    ("a`b", None),
    ("x; DROP DATABASE y", None),
    ("", None),
    ("1abc", None),
    ("with-dash", None),
]


@pytest.mark.parametrize(("name", "expected"), IDENTS)
def test_quote_ident(name: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(ValueError):
            quote_ident(name)
    else:
        assert quote_ident(name) == expected


QUERIES = [
    ("db", "t", ["a"], "QUOTE(`a`)", "`db`.`t`"),
    ("db", "we`ird", ["c`ol", "b"], "QUOTE(`c``ol`), QUOTE(`b`)", "`db`.`we``ird`"),
]


@pytest.mark.parametrize(("database", "table", "columns", "row", "source"), QUERIES)
def test_fingerprint_query_quotes_catalog_names(
    database: str, table: str, columns: list[str], row: str, source: str
) -> None:
    q = fingerprint_query(database, table, columns)
    assert f"CONCAT_WS(',', {row})" in q and q.endswith(f"FROM {source}")
