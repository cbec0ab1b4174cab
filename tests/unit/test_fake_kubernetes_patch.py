"""The fake API server applies patches as the documented API server does (tests/fakes).

Cases from RFC 6902, RFC 7386 (its appendix) and Kubernetes' strategic-merge-patch.md: a fake
that merged a container list instead of replacing it, or the reverse, would let a backend that
sends the wrong patch type pass its tests.
"""

from __future__ import annotations

import pytest

from tests.fakes.kubernetes_patch import (
    JSON_PATCH,
    MERGE,
    STRATEGIC,
    PatchError,
    apply_patch,
    field_selector,
    label_selector,
)

WEB = {"name": "web", "image": "web:1", "args": ["-a"], "resources": {"limits": {"cpu": "1"}}}
PROXY = {"name": "proxy", "image": "proxy:1"}
POD = {"spec": {"containers": [WEB, PROXY]}, "metadata": {"labels": {"app": "web"}}}


@pytest.mark.parametrize(
    ("content_type", "target", "patch", "result"),
    [
        pytest.param(
            STRATEGIC, POD,
            {"spec": {"containers": [{"name": "web", "resources": {"limits": {"memory": "1Gi"}}}]}},
            {"spec": {"containers": [
                {**WEB, "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}, PROXY]},
             "metadata": {"labels": {"app": "web"}}},
            id="smp-containers-merge-by-name",
        ),
        pytest.param(
            MERGE, POD,
            {"spec": {"containers": [{"name": "web", "resources": {"limits": {"memory": "1Gi"}}}]}},
            {"spec": {"containers": [{"name": "web", "resources": {"limits": {"memory": "1Gi"}}}]},
             "metadata": {"labels": {"app": "web"}}},
            id="merge-patch-replaces-lists",
        ),
        pytest.param(
            STRATEGIC, POD, {"spec": {"containers": [{"name": "log", "image": "log:1"}]}},
            {"spec": {"containers": [WEB, PROXY, {"name": "log", "image": "log:1"}]},
             "metadata": {"labels": {"app": "web"}}},
            id="smp-new-item-appended",
        ),
        pytest.param(
            STRATEGIC, POD, {"spec": {"containers": [{"name": "proxy", "$patch": "delete"}]}},
            {"spec": {"containers": [WEB]}, "metadata": {"labels": {"app": "web"}}},
            id="smp-delete-item",
        ),
        pytest.param(
            STRATEGIC, POD, {"spec": {"containers": [{"name": "web", "args": ["-b"]}]}},
            {"spec": {"containers": [{**WEB, "args": ["-b"]}, PROXY]},
             "metadata": {"labels": {"app": "web"}}},
            id="smp-atomic-list-replaced",
        ),
        pytest.param(
            STRATEGIC, POD, {"spec": {"containers": [PROXY], "$patch": "replace"}},
            {"spec": {"containers": [PROXY]}, "metadata": {"labels": {"app": "web"}}},
            id="smp-replace-map",
        ),
        pytest.param(
            STRATEGIC, POD, {"metadata": {"labels": {"app": None, "tier": "front"}}},
            {"spec": POD["spec"], "metadata": {"labels": {"tier": "front"}}},
            id="smp-null-deletes",
        ),
        pytest.param(
            STRATEGIC, {"a": {"x": 1, "y": 2}}, {"a": {"z": 3, "$retainKeys": ["x", "z"]}},
            {"a": {"x": 1, "z": 3}}, id="smp-retain-keys",
        ),
        # RFC 7386 appendix A
        pytest.param(MERGE, {"a": "b"}, {"a": "c"}, {"a": "c"}, id="rfc7386-replace"),
        pytest.param(MERGE, {"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}, id="rfc7386-add"),
        pytest.param(MERGE, {"a": "b", "b": "c"}, {"a": None}, {"b": "c"}, id="rfc7386-null"),
        pytest.param(MERGE, {"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}, id="rfc7386-array"),
        pytest.param(MERGE, {"e": None}, {"a": 1}, {"e": None, "a": 1}, id="rfc7386-keeps-null"),
        # RFC 6902 appendix A
        pytest.param(JSON_PATCH, {"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}],
                     {"foo": "bar", "baz": "qux"}, id="rfc6902-add"),
        pytest.param(JSON_PATCH, {"foo": ["bar", "baz"]},
                     [{"op": "add", "path": "/foo/1", "value": "qux"}],
                     {"foo": ["bar", "qux", "baz"]}, id="rfc6902-insert"),
        pytest.param(JSON_PATCH, {"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}],
                     {"foo": "bar"}, id="rfc6902-remove"),
        pytest.param(JSON_PATCH, {"baz": "qux"},
                     [{"op": "replace", "path": "/baz", "value": "boo"}], {"baz": "boo"},
                     id="rfc6902-replace"),
        pytest.param(JSON_PATCH, {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {}},
                     [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
                     {"foo": {"bar": "baz"}, "qux": {"thud": "fred"}}, id="rfc6902-move"),
        pytest.param(JSON_PATCH, {"a/b": {"m~n": 1}},
                     [{"op": "test", "path": "/a~1b/m~0n", "value": 1}], {"a/b": {"m~n": 1}},
                     id="rfc6902-escaped-test"),
        pytest.param(JSON_PATCH, {"baz": "qux"}, [{"op": "test", "path": "/baz", "value": "bar"}],
                     PatchError, id="rfc6902-test-fails"),
        pytest.param(JSON_PATCH, {"baz": "qux"}, [{"op": "replace", "path": "/nope", "value": 1}],
                     PatchError, id="rfc6902-replace-missing"),
        pytest.param(JSON_PATCH, {}, {"op": "add"}, PatchError, id="json-patch-not-a-list"),
        pytest.param("application/apply-patch+yaml", {}, {}, PatchError, id="unknown-type"),
    ],
)
def test_apply_patch(content_type: str, target: dict, patch, result) -> None:
    before = repr(target)
    if result is PatchError:
        with pytest.raises(PatchError):
            apply_patch(content_type, target, patch)
    else:
        assert apply_patch(content_type, target, patch) == result
    assert repr(target) == before  # the stored object is never changed in place


@pytest.mark.parametrize(
    ("selector", "labels", "match"),
    [
        ("app=web", {"app": "web", "x": "y"}, True),
        ("app==web,tier=front", {"app": "web"}, False),
        ("app!=web", {"app": "db"}, True),
        ("app!=web", {}, True),
        ("canary", {"canary": ""}, True),
        ("!canary", {"canary": ""}, False),
        ("", {}, True),
    ],
)
def test_label_selector(selector: str, labels: dict, match: bool) -> None:
    assert label_selector(selector)(labels) is match


def test_set_based_label_selector_is_refused_not_ignored() -> None:
    with pytest.raises(ValueError, match="not supported"):
        label_selector("env in (a,b)")


@pytest.mark.parametrize(
    ("selector", "fields", "match"),
    [
        ("involvedObject.kind=Pod,involvedObject.name=web-1",
         {"involvedObject.kind": "Pod", "involvedObject.name": "web-1"}, True),
        ("involvedObject.kind=Pod,involvedObject.name=web-1",
         {"involvedObject.kind": "Pod", "involvedObject.name": "web-10"}, False),
        ("type!=Normal", {"type": "Warning"}, True),
    ],
)
def test_field_selector(selector: str, fields: dict, match: bool) -> None:
    supported = {"involvedObject.kind", "involvedObject.name", "type"}
    assert field_selector(selector, supported)(fields) is match


def test_unindexed_field_is_refused() -> None:
    with pytest.raises(ValueError, match="field label not supported: message"):
        field_selector("message=x", {"type"})
