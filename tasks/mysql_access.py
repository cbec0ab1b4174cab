"""What a MySQL / MariaDB access audit reads (seed 003 security: "monitor unauthorized access
attempts, audit log access"): accounts and their global privileges (their own and through roles),
passwords (none, weak plugin, expiry), locked and anonymous accounts, refused logins from the
server's error log, sessions by user and client address; and the pure rules that turn them into
findings (the same `Finding`/`Severity` as the PostgreSQL audit in tasks/pg_access.py).

Two catalogs: MariaDB >= 10.4 keeps an account's password and lock state in `mysql.global_priv`
(JSON); MySQL 8 in columns of `mysql.user`. Privileges come from `information_schema
.USER_PRIVILEGES` on both; role grants from `mysql.roles_mapping` (MariaDB) or `mysql.role_edges`
(MySQL 8). Only MariaDB 10.11 runs here (tests/mariadb_server.py); the MySQL 8 statements follow
MySQL's reference manual and are not exercised by a test.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymysql
from prefect import task
from pydantic import BaseModel, Field

from blocks.mysql import MySQLDatabase
from tasks.mysql import _all, _one, mysql_retries
from tasks.pg_access import (
    FailedLogin,
    Finding,
    LogRead,
    SessionGroup,
    Severity,
    read_log_tail,
)

# Global privileges that reach past data: the server's files, every session's statements,
# shutting it down, making accounts, handing privileges on. SUPER is the superuser mark.
POWERFUL_PRIVILEGES = ("FILE", "PROCESS", "SHUTDOWN", "CREATE USER", "GRANT OPTION")
# Plugins that check a password the account stores; an empty one lets anybody in. Socket and
# Kerberos plugins check who the client is instead.
PASSWORD_PLUGINS = (
    "mysql_native_password",
    "mysql_old_password",
    "caching_sha2_password",
    "sha256_password",
    "ed25519",
)
# the server's own sessions, not clients
_SERVER_USERS = ("system user", "event_scheduler")


class MySQLAccount(BaseModel):
    user: str
    host: str
    privileges: list[str] = Field(
        default_factory=list, description="Global privileges, its own and through its roles."
    )
    roles: list[str] = Field(default_factory=list, description="Roles granted to it.")
    plugin: str | None = None
    has_password: bool | None = Field(None, description="None: the audit login cannot read it.")
    password_expired: bool = False
    password_changed: datetime | None = None
    password_lifetime_days: int | None = Field(
        None, description="Its own setting; None: the server's default_password_lifetime."
    )
    locked: bool = False

    @property
    def name(self) -> str:
        return f"'{self.user}'@'{self.host}'"

    @property
    def superuser(self) -> bool:
        return "SUPER" in self.privileges


# --- reading ----------------------------------------------------------------------------------


_GRANTEE = re.compile(r"^'((?:[^']|'')*)'@'((?:[^']|'')*)'$")


def parse_grantee(grantee: str) -> tuple[str, str] | None:
    """`'user'@'host'` (information_schema's GRANTEE) as (user, host); a role is `'role'` only
    on MariaDB (host '')."""
    m = _GRANTEE.match(grantee)
    if m:
        return m.group(1).replace("''", "'"), m.group(2).replace("''", "'")
    if grantee.startswith("'") and grantee.endswith("'") and len(grantee) >= 2:
        return grantee[1:-1].replace("''", "'"), ""
    return None


def effective_privileges(
    own: dict[tuple[str, str], set[str]], granted_roles: dict[tuple[str, str], set[str]]
) -> dict[tuple[str, str], set[str]]:
    """Each grantee's global privileges with those of every role it can take, roles of roles
    included (a role is keyed (role, ''))."""
    out: dict[tuple[str, str], set[str]] = {}
    for grantee in set(own) | set(granted_roles):
        seen: set[tuple[str, str]] = set()
        todo = [grantee]
        privileges: set[str] = set()
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            privileges |= own.get(current, set())
            todo += [(role, "") for role in granted_roles.get(current, set())]
        out[grantee] = privileges
    return out


@task(**mysql_retries)
def read_accounts(db: MySQLDatabase) -> tuple[list[MySQLAccount], int]:
    """Every account (roles left out) with its effective global privileges, password and lock
    state; and the server's default_password_lifetime (days, 0 = never)."""
    with db.connect() as conn:
        default_lifetime = int(
            (_one(conn, "SELECT @@global.default_password_lifetime AS d") or {}).get("d") or 0
        )
        own: dict[tuple[str, str], set[str]] = {}
        for row in _all(
            conn,
            "SELECT GRANTEE AS g, PRIVILEGE_TYPE AS p, IS_GRANTABLE AS gr"
            " FROM information_schema.USER_PRIVILEGES",
        ):
            grantee = parse_grantee(row["g"])
            if grantee is None:
                continue
            privileges = own.setdefault(grantee, set())
            if row["p"] != "USAGE":
                privileges.add(row["p"])
            if row["gr"] == "YES":
                privileges.add("GRANT OPTION")
        roles = _role_grants(conn)
        for role, privileges in _mariadb_role_privileges(conn).items():
            own.setdefault(role, set()).update(privileges)
        accounts = _catalog_accounts(conn)
    effective = effective_privileges(own, roles)
    for account in accounts:
        key = (account.user, account.host)
        account.privileges = sorted(effective.get(key, set()))
        account.roles = sorted(roles.get(key, set()))
    return accounts, default_lifetime


def _role_grants(conn: Any) -> dict[tuple[str, str], set[str]]:
    """Who was granted which role: MariaDB's mysql.roles_mapping, MySQL 8's mysql.role_edges."""
    out: dict[tuple[str, str], set[str]] = {}
    try:
        rows = _all(conn, "SELECT User AS u, Host AS h, Role AS r FROM mysql.roles_mapping")
    except pymysql.err.ProgrammingError:  # no such table: MySQL
        try:
            rows = _all(
                conn,
                "SELECT TO_USER AS u, TO_HOST AS h, FROM_USER AS r FROM mysql.role_edges",
            )
        except pymysql.err.ProgrammingError:
            return out
    except pymysql.err.OperationalError as exc:
        if exc.args and exc.args[0] in (1142, 1044):  # no SELECT on mysql.*: own grants only
            return out
        raise
    for row in rows:
        out.setdefault((row["u"], row["h"]), set()).add(row["r"])
    return out


# MariaDB's USER_PRIVILEGES leaves roles out; its mysql.user view has their global privileges
_ROLE_COLUMNS = {
    "Super_priv": "SUPER",
    "File_priv": "FILE",
    "Process_priv": "PROCESS",
    "Shutdown_priv": "SHUTDOWN",
    "Create_user_priv": "CREATE USER",
    "Grant_priv": "GRANT OPTION",
}


def _mariadb_role_privileges(conn: Any) -> dict[tuple[str, str], set[str]]:
    """A MariaDB role's powerful global privileges, keyed (role, ''); {} elsewhere (MySQL 8 lists
    its roles, which are accounts, in USER_PRIVILEGES) or without SELECT on mysql.user."""
    try:
        rows = _all(
            conn,
            "SELECT User AS u, Super_priv, File_priv, Process_priv, Shutdown_priv,"
            " Create_user_priv, Grant_priv FROM mysql.user WHERE is_role = 'Y'",
        )
    except (pymysql.err.ProgrammingError, pymysql.err.OperationalError):
        return {}
    return {
        (r["u"], ""): {name for column, name in _ROLE_COLUMNS.items() if r[column] == "Y"}
        for r in rows
    }


def _catalog_accounts(conn: Any) -> list[MySQLAccount]:
    try:
        rows = _all(conn, "SELECT User AS u, Host AS h, Priv AS p FROM mysql.global_priv")
    except pymysql.err.ProgrammingError:  # MySQL 8 (or MariaDB < 10.4)
        return _mysql_user_accounts(conn)
    except pymysql.err.OperationalError as exc:
        if exc.args and exc.args[0] in (1142, 1044):
            return _visible_accounts(conn)
        raise
    return [a for a in (mariadb_account(r["u"], r["h"], r["p"]) for r in rows) if a is not None]


def mariadb_account(user: str, host: str, priv: str | bytes | None) -> MySQLAccount | None:
    """An account from a row of MariaDB's mysql.global_priv; None for a role."""
    data: dict[str, Any] = json.loads(priv or "{}")
    if data.get("is_role"):
        return None
    plugin = data.get("plugin") or "mysql_native_password"
    auth = data.get("authentication_string", "")
    changed = data.get("password_last_changed")
    lifetime = data.get("password_lifetime")
    return MySQLAccount(
        user=user,
        host=host,
        plugin=plugin,
        # root's row after mariadb-install-db has no plugin and no string: no password
        has_password=bool(auth) or plugin not in PASSWORD_PLUGINS,
        # MariaDB marks an expired password with password_last_changed = 0
        password_expired=changed == 0,
        password_changed=datetime.fromtimestamp(changed, UTC) if changed else None,
        password_lifetime_days=None if lifetime in (None, -1) else int(lifetime),
        locked=bool(data.get("account_locked")),
    )


def _mysql_user_accounts(conn: Any) -> list[MySQLAccount]:
    rows = _all(
        conn,
        "SELECT User AS u, Host AS h, plugin, authentication_string AS auth,"
        " password_expired AS expired, password_last_changed AS changed,"
        " password_lifetime AS lifetime, account_locked AS locked FROM mysql.user",
    )
    return [
        MySQLAccount(
            user=r["u"],
            host=r["h"],
            plugin=r["plugin"],
            has_password=bool(r["auth"]) or r["plugin"] not in PASSWORD_PLUGINS,
            password_expired=r["expired"] == "Y",
            password_changed=r["changed"].replace(tzinfo=UTC) if r["changed"] else None,
            password_lifetime_days=r["lifetime"],
            locked=r["locked"] == "Y",
        )
        for r in rows
    ]


def _visible_accounts(conn: Any) -> list[MySQLAccount]:
    """Without SELECT on the mysql schema: the accounts USER_PRIVILEGES shows (the audit login's
    own, or all of them with the grant to read them); passwords not readable."""
    seen = {
        parse_grantee(r["g"])
        for r in _all(conn, "SELECT DISTINCT GRANTEE AS g FROM information_schema.USER_PRIVILEGES")
    }
    return [MySQLAccount(user=u, host=h) for u, h in sorted(g for g in seen if g and g[1])]


@task(**mysql_retries)
def mysql_sessions(db: MySQLDatabase) -> list[SessionGroup]:
    """Client sessions grouped by user and client address (the processlist, without its own
    session and the server's threads). ``oldest_s`` is the longest time a session of the group
    has been in its current state (the processlist has no connection age)."""
    with db.connect() as conn:
        rows = _all(
            conn,
            "SELECT USER AS u, SUBSTRING_INDEX(HOST, ':', 1) AS c, COUNT(*) AS n,"
            " MAX(TIME) AS t FROM information_schema.PROCESSLIST"
            " WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Daemon', 'Binlog Dump')"
            " AND USER NOT IN %s GROUP BY 1, 2 ORDER BY 3 DESC, 1",
            (_SERVER_USERS,),
        )
    return [
        SessionGroup(
            role=r["u"] or "?",
            client=r["c"] or "local",
            application="",
            sessions=int(r["n"]),
            oldest_s=float(r["t"] or 0),
        )
        for r in rows
    ]


# --- refused logins from the error log ---------------------------------------------------------

# MariaDB (log_warnings >= 2, its default) and MySQL 8 (log_error_verbosity = 3) write one line
# per refused login: "... Access denied for user 'app'@'10.0.0.7' (using password: YES)"
_DENIED = re.compile(
    r"Access denied for user '(?P<user>(?:[^']|'')*)'@'(?P<host>[^']*)'"
    r"(?: \(using password: (?P<pw>YES|NO)\))?"
)
_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}[ T]\d{1,2}:\d{2}:\d{2})")


def parse_mysql_failed_logins(lines: list[str]) -> list[FailedLogin]:
    """Refused logins from MariaDB / MySQL error log lines. The server does not say whether the
    user exists (same message either way)."""
    found = []
    for line in lines:
        m = _DENIED.search(line)
        if not m:
            continue
        t = _TIME.search(line)
        found.append(
            FailedLogin(
                at=t.group(1) if t else "",
                user=m.group("user").replace("''", "'"),
                client=m.group("host"),
                reason="wrong password" if m.group("pw") == "YES" else "no password given",
            )
        )
    return found


@task(**mysql_retries)
def read_mysql_failed_logins(
    db: MySQLDatabase, log_path: str | None, max_bytes: int = 16 * 1024 * 1024
) -> tuple[LogRead, int | None]:
    """The tail of the server's error log (``log_path``, else the server's @@log_error when it is
    a file this host can read: the runbook runs on the database host), and the server's count of
    refused logins since it started (MariaDB's Access_denied_errors; None on MySQL)."""
    with db.connect() as conn:
        denied_row = _one(conn, "SHOW GLOBAL STATUS LIKE 'Access_denied_errors'")
        log_error = (_one(conn, "SELECT @@global.log_error AS l") or {}).get("l") or ""
    denied = int(denied_row["Value"]) if denied_row else None
    path_text = log_path or (log_error if log_error.startswith("/") else None)
    if not path_text:
        return (
            LogRead(
                note="the server logs to stderr (log_error empty): give log_path where this "
                "runbook runs on the database host"
            ),
            denied,
        )
    path = Path(path_text)
    try:
        text = read_log_tail(path, max_bytes)
    except OSError as exc:
        return LogRead(note=f"cannot read {path}: {exc.strerror}"), denied
    lines = text.splitlines()
    return (
        LogRead(source=str(path), lines=len(lines), failures=parse_mysql_failed_logins(lines)),
        denied,
    )


# --- findings ---------------------------------------------------------------------------------


class MySQLAuditPolicy(BaseModel):
    allowed_superusers: list[str] = Field(default_factory=lambda: ["root"])
    allowed_powerful: list[str] = Field(
        default_factory=list, description="Accounts (user, or 'user'@'host') allowed FILE etc."
    )
    failed_login_threshold: int = 5
    expiry_warning_days: int = 14


def is_allowed(account: MySQLAccount, names: list[str]) -> bool:
    return (
        account.user in names or account.name in names or f"{account.user}@{account.host}" in names
    )


def mysql_audit_findings(
    accounts: list[MySQLAccount],
    failures: list[FailedLogin],
    policy: MySQLAuditPolicy,
    default_lifetime_days: int,
    now: datetime,
) -> list[Finding]:
    """The audit's findings, most severe first. A locked account cannot log in: only its
    expired password is noted."""
    out: list[Finding] = []

    def add(severity: Severity, account: MySQLAccount, text: str) -> None:
        out.append(Finding(severity=severity, subject=account.name, finding=text))

    for a in accounts:
        if a.locked:
            continue
        anywhere = " from any address" if a.host == "%" else ""
        if a.user == "":
            add(Severity.HIGH, a, f"anonymous account: any user name logs in from '{a.host}'")
        elif a.has_password is False and a.plugin in PASSWORD_PLUGINS:
            add(Severity.HIGH, a, f"can log in without a password{anywhere}")
        if a.superuser and not is_allowed(a, policy.allowed_superusers):
            via = f" (through role {', '.join(a.roles)})" if a.roles else ""
            add(Severity.HIGH, a, f"has SUPER{via} and is not in the allowed list{anywhere}")
        if a.plugin == "mysql_old_password":
            add(
                Severity.MEDIUM, a, "password hashed with mysql_old_password (broken): set it again"
            )
        powers = [p for p in POWERFUL_PRIVILEGES if p in a.privileges]
        if powers and not a.superuser and not is_allowed(a, policy.allowed_powerful):
            add(Severity.MEDIUM, a, f"can log in with {', '.join(powers)}{anywhere}")
        if a.password_expired:
            add(Severity.LOW, a, "password expired (must be changed at the next login)")
            continue
        lifetime = (
            a.password_lifetime_days
            if a.password_lifetime_days is not None
            else default_lifetime_days
        )
        if a.has_password and lifetime and a.password_changed is not None:
            expires = a.password_changed + timedelta(days=lifetime)
            left = expires - now
            if left < timedelta(0):
                add(Severity.LOW, a, f"password expired on {expires:%Y-%m-%d}")
            elif left < timedelta(days=policy.expiry_warning_days):
                add(
                    Severity.MEDIUM,
                    a,
                    f"password expires on {expires:%Y-%m-%d} (in {left.days} days)",
                )
    by_client = Counter((f.user, f.client) for f in failures)
    for (user, client), n in by_client.most_common():
        if n >= policy.failed_login_threshold:
            out.append(
                Finding(
                    severity=Severity.HIGH,
                    subject=f"{user} from {client}",
                    finding=f"{n} refused logins: guessing passwords, probing user names, or a "
                    "client with a stale password",
                )
            )
    order = {Severity.HIGH: 0, Severity.MEDIUM: 1, Severity.LOW: 2}
    return sorted(out, key=lambda f: (order[f.severity], f.subject))
