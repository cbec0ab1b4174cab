"""examples/: the Prometheus rules and the Alertmanager configuration are valid, and they agree with
prefect.yaml: every alert a trigger waits for has a rule that fires with the labels the trigger reads,
and Alertmanager routes exactly those alerts to the gateway."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.catalog import PROJECT_ROOT, load_catalog

EXAMPLES = PROJECT_ROOT / "examples"
RULES = EXAMPLES / "prometheus" / "alerts.yml"
RULE_TESTS = EXAMPLES / "prometheus" / "alerts_test.yml"
ALERTMANAGER_CONFIG = EXAMPLES / "alertmanager.yml"
SEVERITIES = {"critical", "warning", "info"}
TEMPLATED_LABEL = re.compile(r"event\.resource\.get\('([^']+)'")


def triggered_alerts() -> dict[str, tuple[str, set[str]]]:
    """alertname -> (deployment whose trigger matches it, labels the trigger's parameters read)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for spec in load_catalog():
        for trigger in spec.triggers:
            names = trigger["match"]["alertname"]
            labels = set(TEMPLATED_LABEL.findall(json.dumps(trigger.get("parameters", {}))))
            for name in [names] if isinstance(names, str) else names:
                assert name not in found, f"{name} starts both {found[name][0]} and {spec.name}"
                found[name] = (spec.name, labels)
    return found


TRIGGERED = triggered_alerts()


def rules() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in document["groups"] for r in g["rules"] if "alert" in r}


def fired_label_sets() -> dict[str, list[dict[str, str]]]:
    """alertname -> the exact label sets the promtool tests see it fire with."""
    fired: dict[str, list[dict[str, str]]] = {}
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            for alert in check.get("exp_alerts") or []:
                fired.setdefault(check["alertname"], []).append(alert["exp_labels"])
    return fired


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which(argv[0])
    assert binary, (
        f"{argv[0]} not installed: run `make test` (installs prometheus and prometheus-alertmanager)"
    )
    return subprocess.run(
        [binary, *argv[1:]], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_accepts_the_rules() -> None:
    result = run_tool("promtool", "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_every_rule_fires_in_promtool_unit_tests() -> None:
    result = run_tool("promtool", "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(fired_label_sets()) == set(rules()), (
        "every rule needs a promtool case where it fires"
    )


def test_amtool_accepts_the_alertmanager_config() -> None:
    result = run_tool("amtool", "check-config", str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_starts_a_runbook() -> None:
    assert set(rules()) == set(TRIGGERED), (
        "alerts.yml and prefect.yaml's triggers disagree: "
        f"rules without a runbook {set(rules()) - set(TRIGGERED)}, "
        f"runbook alerts without a rule {set(TRIGGERED) - set(rules())}"
    )


@pytest.mark.parametrize("alertname", sorted(TRIGGERED))
def test_rule_fires_with_the_labels_its_trigger_reads(alertname: str) -> None:
    deployment, needed = TRIGGERED[alertname]
    rule = rules().get(alertname)
    assert rule is not None, f"no rule in {RULES.name} for {alertname} (prefect.yaml: {deployment})"
    # promtool compares exp_labels with the alert's labels exactly, so these are the labels it carries
    fired = fired_label_sets().get(alertname, [])
    assert fired, f"no promtool case in {RULE_TESTS.name} where {alertname} fires"
    for labels in fired:
        missing = needed - {"alertname"} - set(labels)
        assert not missing, f"{alertname} fires without {sorted(missing)}, which {deployment} reads"


@pytest.mark.parametrize("alertname", sorted(TRIGGERED))
def test_rule_is_complete(alertname: str) -> None:
    deployment, _ = TRIGGERED[alertname]
    rule = rules()[alertname]
    assert rule.get("for"), "a rule without `for:` pages on a single bad scrape"
    assert rule.get("labels", {}).get("severity") in SEVERITIES
    annotations = rule.get("annotations", {})
    assert {"summary", "description", "runbook_url"} <= set(annotations)
    assert annotations["runbook_url"].endswith(f"/{deployment}")


def test_alertmanager_routes_exactly_the_runbook_alerts_to_the_gateway() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    (route,) = [r for r in config["route"]["routes"] if r["receiver"] == "runbooks-gateway"]
    (matcher,) = route["matchers"]
    match = re.fullmatch(r'alertname\s*=~\s*"([^"]+)"', matcher)
    assert match, f"expected an alertname regex matcher, got {matcher!r}"
    assert set(match.group(1).split("|")) == set(TRIGGERED)

    (receiver,) = [r for r in config["receivers"] if r["name"] == "runbooks-gateway"]
    (webhook,) = receiver["webhook_configs"]
    assert webhook["url"].endswith("/alerts/alertmanager")
    assert webhook["send_resolved"] is True
    auth = webhook["http_config"]["authorization"]
    assert auth.get("type", "Bearer") == "Bearer"
    assert Path(auth["credentials_file"]).is_absolute()
    assert "credentials" not in auth, "the token belongs in a file, not in the config"

    # alerts without a runbook stay in Alertmanager: the root receiver notifies nobody
    (root,) = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
    assert set(root) == {"name"}
