"""The DynamoWorkerMetadata CRD schema check (fixture: ``fixtures/dynamoworkermetadata-v1alpha1
.crd.yaml``, its header names the operator commit it comes from).

``dwm_errors(obj)`` lists what is wrong with an object against the CRD's ``openAPIV3Schema``
(empty: valid). ``x-kubernetes-preserve-unknown-fields`` is not a JSON-schema keyword, so it
is ignored, which is how the API server reads it (``spec.data`` may hold any object).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_PATH = Path(__file__).parent / "fixtures" / "dynamoworkermetadata-v1alpha1.crd.yaml"
CRD = yaml.safe_load(CRD_PATH.read_text())


def dwm_errors(obj: dict[str, Any]) -> list[str]:
    schema = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    if obj.get("apiVersion") != f"{CRD['spec']['group']}/v1alpha1":
        errors.append(f"apiVersion: {obj.get('apiVersion')!r}")
    if obj.get("kind") != CRD["spec"]["names"]["kind"]:
        errors.append(f"kind: {obj.get('kind')!r}")
    return errors
