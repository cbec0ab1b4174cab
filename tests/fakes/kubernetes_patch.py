"""How the fake API server applies a PATCH and reads selectors, as the real one documents it.

The official client sends a dict body as ``application/strategic-merge-patch+json``, a list
body as ``application/json-patch+json`` (what ``kubectl rollout undo`` sends for Deployments),
and ``application/merge-patch+json`` when asked to (``_content_type``). Each one means
something different to the API server, and a backend that sends the wrong one can
silently keep fields it meant to replace, so the fake applies each by its own rules:

- JSON Patch (RFC 6902): add, remove, replace, test, move, copy on JSON Pointers; a failed
  ``test`` or a missing path is a 422, as the API server answers;
- JSON Merge Patch (RFC 7386): maps merge, ``null`` deletes, lists are replaced whole;
- strategic merge patch (sig-api-machinery's strategic-merge-patch.md): like a merge patch,
  except that lists with a patch merge key (``containers`` by ``name``, ...) merge item by item,
  and the ``$patch: replace`` / ``$patch: delete`` directives (a StatefulSet's
  ControllerRevision data is a ``$patch: replace`` of its template). ``$setElementOrder``
  and ``$retainKeys`` lists are accepted; only element order, which the fake ignores, or
  retained keys are affected.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

# The patchMergeKey of list fields in the core/apps/autoscaling types (k8s.io/api struct
# tags). Lists not named here are atomic: a strategic merge patch replaces them whole.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "ownerReferences": "uid",
    "resizePolicy": "resourceName",
    "topologySpreadConstraints": "topologyKey",
    "conditions": "type",
}

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class PatchError(ValueError):
    """The patch cannot be applied (the API server answers 422 or 400)."""


def apply_patch(content_type: str | None, target: dict[str, Any], patch: Any) -> dict[str, Any]:
    """``target`` with ``patch`` applied as ``content_type`` says (target itself is untouched)."""
    kind = (content_type or "").split(";")[0].strip()
    if kind == JSON_PATCH:
        if not isinstance(patch, list):
            raise PatchError("a JSON patch is a list of operations")
        return json_patch(target, patch)
    if not isinstance(patch, dict):
        raise PatchError(f"a {kind or 'merge'} patch is a JSON object")
    if kind == MERGE:
        return merge_patch(target, patch)
    if kind == STRATEGIC:
        return strategic_merge_patch(target, patch)
    raise PatchError(f"unsupported patch type {kind!r}")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge patch of a map (see the module docstring)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive not in (None, "merge"):
        raise PatchError(f"unknown patch directive {directive!r} in a map")
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain: list[str] | None = None
    for key, value in patch.items():
        if key == "$patch" or key.startswith("$setElementOrder/"):
            continue
        if key == "$retainKeys":
            retain = list(value or [])
            continue
        if key.startswith("$"):
            raise PatchError(f"unsupported patch directive {key!r}")
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and value.get("$patch") == "delete":
            result.pop(key, None)
        elif isinstance(value, list) and key in MERGE_KEYS:
            result[key] = _merge_list(result.get(key) or [], value, MERGE_KEYS[key])
        elif isinstance(value, dict):
            result[key] = strategic_merge_patch(result.get(key), value)
        else:
            result[key] = copy.deepcopy(value)
    if retain is not None:
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(current: list[Any], patch: list[Any], key: str) -> list[Any]:
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and "$patch" in i)]
    result = copy.deepcopy(current)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise PatchError(f"a list item of a merging list lacks its merge key {key!r}")
        at = next((n for n, old in enumerate(result) if old.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if at is not None:
                del result[at]
        elif at is None:
            result.append(strategic_merge_patch({}, item))
        else:
            result[at] = strategic_merge_patch(result[at], item)
    return result


def json_patch(target: dict[str, Any], operations: list[Any]) -> dict[str, Any]:
    """RFC 6902 (with RFC 6901 pointers)."""
    doc: Any = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"not a JSON patch operation: {op!r}")
        kind, path = op["op"], op["path"]
        if kind == "test":
            if _get(doc, path) != op.get("value"):
                raise PatchError(f"testing value {path} failed")
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind in ("add", "replace"):
            if kind == "replace":
                _get(doc, path)  # must exist
                doc = _remove(doc, path) if path else doc
            doc = _add(doc, path, copy.deepcopy(op.get("value")), replace=kind == "replace")
        elif kind in ("move", "copy"):
            value = copy.deepcopy(_get(doc, op["from"]))
            if kind == "move":
                doc = _remove(doc, op["from"])
            doc = _add(doc, path, value, replace=False)
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}")
    return doc


def _tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer {path!r} does not start with '/'")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _step(node: Any, token: str, path: str) -> Any:
    if isinstance(node, dict) and token in node:
        return node[token]
    if isinstance(node, list) and token.isdigit() and int(token) < len(node):
        return node[int(token)]
    raise PatchError(f"path {path} does not exist")


def _get(doc: Any, path: str) -> Any:
    node = doc
    for token in _tokens(path):
        node = _step(node, token, path)
    return node


def _parent(doc: Any, path: str) -> tuple[Any, str]:
    tokens = _tokens(path)
    if not tokens:
        raise PatchError("the whole document cannot be removed")
    node = doc
    for token in tokens[:-1]:
        node = _step(node, token, path)
    return node, tokens[-1]


def _remove(doc: Any, path: str) -> Any:
    parent, last = _parent(doc, path)
    _step(parent, last, path)
    if isinstance(parent, dict):
        del parent[last]
    else:
        del parent[int(last)]
    return doc


def _add(doc: Any, path: str, value: Any, *, replace: bool) -> Any:
    if path == "":
        return value
    parent, last = _parent(doc, path)
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise PatchError(f"path {path} is out of range")
    else:
        raise PatchError(f"path {path} does not exist")
    return doc


# label and field selectors ------------------------------------------------------------------


def label_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """Equality-based label selector (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``), comma = AND."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        if " " in term or "(" in term:
            raise ValueError(f"set-based selector {term!r} is not supported by this fake")
        if "!=" in term:
            k, v = term.split("!=", 1)
            tests.append(lambda labels, k=k, v=v: labels.get(k) != v)
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            tests.append(lambda labels, k=k, v=v: labels.get(k) == v)
        elif term.startswith("!"):
            tests.append(lambda labels, k=term[1:]: k not in labels)
        else:
            tests.append(lambda labels, k=term: k in labels)
    return lambda labels: all(t(labels) for t in tests)


def field_selector(text: str, supported: set[str]) -> Callable[[dict[str, str]], bool]:
    """A field selector (``f=v``, ``f==v``, ``f!=v``, comma = AND) over ``supported`` fields.

    The API server refuses a field it does not index with 400 "field label not supported".
    """
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        negate = "!=" in term
        k, sep, v = term.replace("!=", "=").replace("==", "=").partition("=")
        if not sep:
            raise ValueError(f"invalid field selector term {term!r}")
        if k not in supported:
            raise ValueError(f'field label not supported: {k}')
        tests.append(lambda fields, k=k, v=v, n=negate: (fields.get(k, "") == v) != n)
    return lambda fields: all(t(fields) for t in tests)
