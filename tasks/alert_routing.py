"""Which receiver an Alertmanager configuration sends an alert to (pure).

The pre-deployment checklist asks "are alert notifications set up": does each alert that starts
a runbook reach the gateway's webhook? Alertmanager has no API that answers this (amtool's
`config routes test` does, but amtool is not on a worker), so the routing tree of the config it
reports (GET /api/v2/status, `config.original`) is walked here the way Alertmanager walks it:
depth first, the first matching child wins unless it has `continue: true`, a route with no
matching child keeps the alert itself. Matchers: `matchers` (`=`, `!=`, `=~`, `!~`, anchored
regexes), and the older `match` / `match_re` maps.
"""

from __future__ import annotations

import re
from typing import Any

_MATCHER = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|(\S*))\s*$')


def _parse_matcher(text: str) -> tuple[str, str, str]:
    found = _MATCHER.match(text)
    if not found:
        raise ValueError(f"cannot read matcher {text!r}")
    name, op, quoted, bare = found.groups()
    if quoted is None:
        return name, op, bare
    value = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), quoted)
    return name, op, value


def _holds(op: str, actual: str, value: str) -> bool:
    if op == "=":
        return actual == value
    if op == "!=":
        return actual != value
    matched = re.fullmatch(value, actual) is not None
    return matched if op == "=~" else not matched


def route_matches(route: dict[str, Any], labels: dict[str, str]) -> bool:
    for text in route.get("matchers") or []:
        name, op, value = _parse_matcher(text)
        if not _holds(op, labels.get(name, ""), value):
            return False
    for name, value in (route.get("match") or {}).items():
        if labels.get(name, "") != str(value):
            return False
    for name, value in (route.get("match_re") or {}).items():
        if re.fullmatch(str(value), labels.get(name, "")) is None:
            return False
    return True


def receivers_for(config: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """The receivers Alertmanager would notify for an alert with ``labels``."""

    def walk(route: dict[str, Any], inherited: str) -> list[str]:
        receiver = route.get("receiver") or inherited
        found: list[str] = []
        for child in route.get("routes") or []:
            if route_matches(child, labels):
                found += walk(child, receiver)
                if not child.get("continue", False):
                    break
        return found or [receiver]

    root = config.get("route") or {}
    return walk(root, root.get("receiver", ""))


def webhook_urls(config: dict[str, Any], receiver: str) -> list[str]:
    for r in config.get("receivers") or []:
        if r.get("name") == receiver:
            return [w.get("url", "") for w in r.get("webhook_configs") or []]
    return []


def unrouted(config: dict[str, Any], alertnames: list[str], gateway_path: str) -> list[str]:
    """The alerts among ``alertnames`` that would not reach a webhook ending in ``gateway_path``."""
    missing = []
    for name in alertnames:
        urls = [
            url
            for receiver in receivers_for(config, {"alertname": name})
            for url in webhook_urls(config, receiver)
        ]
        if not any(url.rstrip("/").endswith(gateway_path.rstrip("/")) for url in urls):
            missing.append(name)
    return missing
