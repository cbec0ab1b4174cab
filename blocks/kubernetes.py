"""Kubernetes cluster connection settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import yaml
from kubernetes import config
from kubernetes.client import ApiClient, AppsV1Api, Configuration, CoreV1Api
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator, model_validator

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr

_API_TYPES = {"core": CoreV1Api, "apps": AppsV1Api}


class KubernetesCluster(Block):
    """How to reach the Kubernetes API server of a cluster runbooks act on.

    Why not prefect-kubernetes' ``KubernetesClusterConfig``/``KubernetesCredentials``: that
    block stores the whole kubeconfig (tokens, client keys) as a plain ``dict``, shown in the
    UI and saved unmasked, and its clients are async (``kubernetes_asyncio``) while runbook
    tasks are synchronous. This block keeps the kubeconfig as a ``SecretStr`` and builds the
    synchronous ``kubernetes`` client. A kubeconfig exported with
    ``kubectl config view --minify --flatten`` pastes in as is.

    Every client it builds has urllib3's own retries turned off: tasks decide what to retry
    (transient errors only) and every call passes its own ``_request_timeout``.

    Example:
        ```python
        from blocks.kubernetes import KubernetesCluster
        cluster = KubernetesCluster.load("BLOCK_NAME")
        with cluster.get_client("core") as core:
            pods = core.list_namespaced_pod(
                cluster.namespace, label_selector="app=kafka",
                _request_timeout=cluster.request_timeout_s,
            )
        ```
    """

    _block_type_name = "Runbooks Kubernetes Cluster"
    _block_type_slug = "runbooks-kubernetes-cluster"
    _description = "Kubeconfig (secret) or in-cluster service account, namespace and timeouts of a Kubernetes cluster."
    model_config = BLOCK_CONFIG

    kubeconfig: OptionalSecretStr = Field(
        None,
        description="Contents of a kubeconfig file. It holds credentials, so it is a secret. The "
        "form's secret field is one line, which breaks YAML: paste the JSON form "
        "(`kubectl config view --minify --flatten -o json`), or save the YAML with "
        "`runbooks block save kubernetes-cluster NAME --kubeconfig-stdin < kubeconfig`. "
        "Leave empty when in_cluster is set.",
    )
    context: str | None = Field(
        None, description="kubeconfig context to use; empty: the kubeconfig's current-context."
    )
    in_cluster: bool = Field(
        False,
        description="Use the service account of the pod the flow runs in instead of a kubeconfig.",
    )
    namespace: str = Field(
        "default", description="Namespace runbooks act in unless a run names another one."
    )
    request_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Timeout of every Kubernetes API request, in seconds."
    )

    @field_validator("kubeconfig")
    @classmethod
    def _kubeconfig_is_a_mapping(cls, kubeconfig: SecretStr | None) -> SecretStr | None:
        if kubeconfig is None:
            return None
        try:
            parsed = yaml.safe_load(kubeconfig.get_secret_value())
        except yaml.YAMLError:
            # not chained and not repeated: YAML's message quotes the document's credentials
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError(
                "kubeconfig is not a YAML or JSON mapping (YAML pasted into a one-line field "
                "loses its line breaks: paste `kubectl config view --minify --flatten -o json`)"
            )
        return kubeconfig

    @model_validator(mode="after")
    def _one_way_to_connect(self) -> KubernetesCluster:
        if self.in_cluster == (self.kubeconfig is not None):
            raise ValueError("set exactly one of kubeconfig or in_cluster")
        return self

    def get_api_client(self) -> ApiClient:
        """A synchronous API client for this cluster (holds credentials: never log it)."""
        configuration = Configuration(retries=False)
        if self.in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            return ApiClient(configuration)
        assert self.kubeconfig is not None
        return config.new_client_from_config_dict(
            yaml.safe_load(self.kubeconfig.get_secret_value()),
            context=self.context,
            persist_config=False,
            client_configuration=configuration,
        )

    @contextmanager
    def get_client(self, kind: Literal["core", "apps"]) -> Iterator[CoreV1Api | AppsV1Api]:
        """A resource API (``core``: pods; ``apps``: StatefulSets, Deployments), closed on exit."""
        with self.get_api_client() as api_client:
            yield _API_TYPES[kind](api_client)
