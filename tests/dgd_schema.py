"""Validate a DynamoGraphDeployment manifest as the Dynamo operator's CRD (v1beta1) would.

``dgd_errors(document)`` returns every problem found, empty when the manifest is valid:

* the JSON-schema part: the CRD excerpt in ``fixtures/`` (its header says where it comes
  from) with its ``podTemplate.spec`` replaced by the strict ``core/v1 PodSpec`` schema of
  the kubernetes-validate package (Kubernetes 1.34): unknown fields are errors, as under
  kubectl's strict field validation;
* the CRD's admission rules that JSON schema cannot express (its CEL rules and the
  ``podTemplate`` contract): component names unique case-insensitively, and every component
  has a container named ``main`` with a non-empty image.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

CRD_EXCERPT = Path(__file__).parent / "fixtures" / "dynamographdeployment-v1beta1.crd-excerpt.yaml"
KUBERNETES_VERSION = "1.34.0"
EMBEDDED = "x-embedded-kubernetes-type"


def _definitions() -> dict[str, Any]:
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = root / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _embed(node: Any, base: str) -> Any:
    if isinstance(node, dict):
        if EMBEDDED in node:
            return {"$ref": f"{base}#/$defs/{node[EMBEDDED]}"}
        return {key: _embed(value, base) for key, value in node.items()}
    if isinstance(node, list):
        return [_embed(value, base) for value in node]
    return node


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load(CRD_EXCERPT.read_text(encoding="utf-8"))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    definitions = _definitions()
    schema = _embed(copy.deepcopy(version["schema"]["openAPIV3Schema"]), definitions["$id"])
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def dgd_errors(document: dict[str, Any]) -> list[str]:
    """Every reason the operator's CRD would refuse ``document`` (empty: valid)."""
    errors = [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in _validator().iter_errors(document)
    ]
    if document.get("apiVersion") != "nvidia.com/v1beta1":
        errors.append(f"apiVersion: {document.get('apiVersion')!r} is not nvidia.com/v1beta1")
    if document.get("kind") != "DynamoGraphDeployment":
        errors.append(f"kind: {document.get('kind')!r} is not DynamoGraphDeployment")
    components = (document.get("spec") or {}).get("components") or []
    names = [str(c.get("name", "")).lower() for c in components if isinstance(c, dict)]
    if len(names) != len(set(names)):
        errors.append(f"spec/components: names are not unique case-insensitively: {names}")
    for index, component in enumerate(components):
        if not isinstance(component, dict):
            continue
        containers = ((component.get("podTemplate") or {}).get("spec") or {}).get("containers")
        main = [c for c in containers or [] if isinstance(c, dict) and c.get("name") == "main"]
        if not main or not main[0].get("image"):
            errors.append(
                f"spec/components/{index}: podTemplate needs a container named main with an image"
            )
    return errors
