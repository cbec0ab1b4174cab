"""Every Block class meets the same standard: documented fields, secrets as SecretStr, stable slug."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prefect.blocks.core import Block
from pydantic import ValidationError

import blocks
from blocks.kubernetes import KubernetesCluster

BLOCK_CLASSES = [
    getattr(blocks, name)
    for name in blocks.__all__
    if isinstance(getattr(blocks, name), type) and issubclass(getattr(blocks, name), Block)
]
SECRET_NAME = re.compile(r"password|token|secret|api_key|kubeconfig", re.I)


def _annotation_text(field) -> str:
    return repr(field.annotation)


def test_every_block_is_exported() -> None:
    assert len(BLOCK_CLASSES) == len(blocks.__all__)


@pytest.mark.parametrize("cls", BLOCK_CLASSES, ids=lambda c: c.__name__)
def test_block_meets_the_standard(cls: type[Block]) -> None:
    assert cls.__doc__ and cls.__doc__.strip(), "a block explains itself"
    assert cls.get_block_type_slug().startswith("runbooks-")
    assert cls._description, "shown in the UI's block catalogue"
    for name, field in cls.model_fields.items():
        assert field.description, f"{cls.__name__}.{name} has no description"
        if SECRET_NAME.search(name):
            assert "SecretStr" in _annotation_text(field) or "Block" in _annotation_text(field), (
                f"{cls.__name__}.{name} looks secret but is not a SecretStr"
            )


@pytest.mark.parametrize("cls", BLOCK_CLASSES, ids=lambda c: c.__name__)
def test_secret_fields_render_as_password_inputs(cls: type[Block]) -> None:
    """Prefect's UI masks a field whose schema is one string of format `password` (as for its own
    SlackWebhook URL); an anyOf[password, null] renders as "password | None" tabs instead."""
    schema = cls.model_json_schema()
    own_secrets = [name for name in schema["secret_fields"] if "." not in name]
    assert own_secrets == [
        name for name, field in cls.model_fields.items() if "SecretStr" in _annotation_text(field)
    ]
    for name in own_secrets:
        prop = schema["properties"][name]
        assert "anyOf" not in prop, f"{cls.__name__}.{name} renders as tabs, not a password input"
        assert (prop.get("type"), prop.get("format"), prop.get("writeOnly")) == (
            "string",
            "password",
            True,
        ), f"{cls.__name__}.{name}: {prop}"


@pytest.mark.parametrize("cls", BLOCK_CLASSES, ids=lambda c: c.__name__)
def test_code_example_names_the_block_the_page_shows(cls: type[Block]) -> None:
    """The block page shows the block type's code example with "BLOCK_NAME" replaced by the
    block's own name (both Prefect UIs); any other name in it is wrong for every block."""
    example = cls.get_code_example()
    code = re.search(r"```python([\s\S]*?)```", example)
    assert code, f"{cls.__name__}: the UI shows only a ```python fenced example"
    loads = re.findall(r"\.load\(([^)]*)\)", code.group(1))
    assert loads == ['"BLOCK_NAME"'], f"{cls.__name__} loads {loads}"


KUBECONFIG_YAML = """apiVersion: v1
clusters:
- cluster: {server: 'https://k8s:6443'}
  name: c
contexts:
- context: {cluster: c, user: u}
  name: c
current-context: c
users:
- name: u
  user: {token: kubeconfig-token-value}
"""

# kubeconfig as pasted -> accepted
KUBECONFIG_CASES = [
    (KUBECONFIG_YAML, True),
    (json.dumps(yaml.safe_load(KUBECONFIG_YAML), indent=2).replace("\n", ""), True),
    # YAML loses its line breaks in the UI's one-line secret field
    (KUBECONFIG_YAML.replace("\n", ""), False),
    ("just-a-token", False),
]


@pytest.mark.parametrize(("kubeconfig", "accepted"), KUBECONFIG_CASES)
def test_kubeconfig_must_be_a_mapping_and_errors_never_quote_it(
    kubeconfig: str, accepted: bool
) -> None:
    if accepted:
        KubernetesCluster(kubeconfig=kubeconfig)
        return
    with pytest.raises(ValidationError) as error:
        KubernetesCluster(kubeconfig=kubeconfig)
    assert "kubectl config view --minify --flatten -o json" in str(error.value)
    assert "kubeconfig-token-value" not in str(error.value)
    assert "just-a-token" not in str(error.value)


SENTINEL = "sentinel-secret-value"

# block, input that fails validation and holds a secret (also nested, in a parent's input)
INVALID_INPUTS = [
    (blocks.FlinkCluster, {"rest_url": "http://flink:8081", "password": SENTINEL}),
    (blocks.PostgresDatabase, {"password": SENTINEL}),
    (blocks.MySQLDatabase, {"host": "db", "password": SENTINEL}),
    (blocks.KafkaCluster, {"sasl_password": SENTINEL}),
    (blocks.KubernetesCluster, {"kubeconfig": SENTINEL}),
    (blocks.EscalationPolicy, {"webhook_token": SENTINEL, "attempts": 0}),
    (blocks.EventStore, {"database": {"host": "db", "password": SENTINEL}}),
    (blocks.BackupStore, {"bucket": "x", "aws_secret_access_key": SENTINEL}),
    (blocks.SupervisorHost, {"url": "http://sv:9001/RPC2", "password": SENTINEL}),
    (blocks.SupervisorHost, {"url": f"http://admin:{SENTINEL}@sv:9001/RPC2"}),
    (blocks.DockerHost, {"base_url": "tcp://docker:2376", "tls_client_key": SENTINEL}),
    (blocks.DockerHost, {"tls": True, "tls_client_cert": "x", "tls_client_key": SENTINEL}),
    (blocks.RedisServer, {"port": 0, "password": SENTINEL}),
    (blocks.PrometheusServer, {"url": "http://p:9090", "token": SENTINEL, "username": "u"}),
    (blocks.AlertmanagerServer, {"url": "ftp://am", "password": SENTINEL}),
    (
        blocks.AwsAccount,
        {"endpoint_url": "nowhere", "credentials": {"aws_secret_access_key": SENTINEL}},
    ),
    (blocks.SparkCluster, {"rest_url": "http://spark:6066", "token": SENTINEL, "username": "u"}),
]


def test_every_block_is_checked_for_secrets_in_errors() -> None:
    assert {cls for cls, _ in INVALID_INPUTS} >= {
        cls for cls in BLOCK_CLASSES if cls.model_json_schema()["secret_fields"]
    }


@pytest.mark.parametrize(("cls", "data"), INVALID_INPUTS, ids=lambda v: getattr(v, "__name__", ""))
def test_validation_errors_never_repeat_a_secret(cls: type[Block], data: dict) -> None:
    with pytest.raises(ValidationError) as error:
        cls.model_validate(data)
    assert SENTINEL not in str(error.value)
    assert SENTINEL not in repr(error.value)
