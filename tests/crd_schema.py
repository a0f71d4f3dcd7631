"""Strict validation of a custom resource against the CRD that defines it, offline.

Used by tests/deploy/test_helm_lws.py for the chart's LeaderWorkerSet. ``crd_validator(path)`` reads a
CRD kept in the repo (tests/schemas/, see its README.md for sources) and returns a jsonschema
validator of one of its versions, built the way the API server judges an object under
``kubectl apply --validate=strict`` (field validation Strict):

- every object schema that lists ``properties`` (and neither ``additionalProperties`` nor
  ``x-kubernetes-preserve-unknown-fields``) refuses unknown fields: the API server would prune
  them, strict field validation refuses them;
- the root ``metadata`` (``type: object`` in every CRD) is the real ObjectMeta;
- each ``x-cleave-elided: <definition>`` node (a core type that the stored copy leaves out,
  e.g. ``io.k8s.api.core.v1.PodSpec``) becomes a ``$ref`` to that definition in the strict
  Kubernetes OpenAPI that kubernetes-validate ships for ``KUBE_VERSION``.

Raises FileNotFoundError for a missing CRD file, KeyError naming the version or definition
that the CRD or kubernetes-validate lacks.
"""
from __future__ import annotations

import copy
import importlib.resources
import json
import pathlib

import jsonschema
import referencing
import yaml

SCHEMAS = pathlib.Path(__file__).resolve().parent / "schemas"
KUBE_VERSION = "1.33.0"
ELIDED = "x-cleave-elided"
_DEFS_ID = "https://kubernetes.io/api/_definitions.json"  # the $id of kubernetes-validate's definitions


def kubernetes_definitions(kube_version: str = KUBE_VERSION) -> dict:
    """kubernetes-validate's strict ``_definitions.json`` of that Kubernetes version."""
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return json.loads((folder / f"v{kube_version}-local-strict" / "_definitions.json").read_text())


def load_crd(path: pathlib.Path) -> dict:
    """The CustomResourceDefinition document of a YAML file (comments and other documents skipped)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise ValueError(f"{path}: expected one CustomResourceDefinition, found {len(crds)}")
    return crds[0]


def elided(node) -> list[str]:
    """The definitions that ``x-cleave-elided`` markers stand for, in document order."""
    if isinstance(node, dict):
        return ([node[ELIDED]] if ELIDED in node else []) + [d for v in node.values() for d in elided(v)]
    if isinstance(node, list):
        return [d for v in node for d in elided(v)]
    return []


def _strict(node: dict, defs: dict) -> dict:
    """A copy of an OpenAPI v3 structural schema node as a strict JSON schema (see the module doc)."""
    if ELIDED in node:
        name = node[ELIDED]
        if name not in defs:
            raise KeyError(f"{name} is not a Kubernetes definition known to kubernetes-validate")
        return {"$ref": f"{_DEFS_ID}#/$defs/{name}", "description": node.get("description", "")}
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: _strict(v, defs) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strict(value, defs)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_strict(v, defs) for v in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validator(path: pathlib.Path, version: str = "v1",
                  kube_version: str = KUBE_VERSION) -> jsonschema.protocols.Validator:
    """A Draft 2020-12 validator of ``version`` of the CRD at ``path`` (see the module doc)."""
    crd = load_crd(path)
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in served:
        raise KeyError(f"{path}: no version {version!r} (has {sorted(served)})")
    definitions = kubernetes_definitions(kube_version)
    schema = _strict(served[version]["schema"]["openAPIV3Schema"], definitions["$defs"])
    schema["properties"]["metadata"] = {
        "$ref": f"{_DEFS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    group = crd["spec"]["group"]
    schema["properties"]["apiVersion"]["enum"] = [f"{group}/{version}"]
    schema["properties"]["kind"]["enum"] = [crd["spec"]["names"]["kind"]]
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    cls = jsonschema.validators.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def problems(validator: jsonschema.protocols.Validator, doc: dict) -> list[str]:
    """Every violation of ``doc``, as ``path: message`` lines (empty when it validates)."""
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]
