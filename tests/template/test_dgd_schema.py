"""The DynamoGraphDeployment check of tests/dgd_schema.py refuses what the operator would."""

from __future__ import annotations

import copy

import pytest
from dgd_schema import dgd_errors

VALID = {
    "apiVersion": "nvidia.com/v1beta1",
    "kind": "DynamoGraphDeployment",
    "metadata": {"name": "demo"},
    "spec": {
        "components": [
            {
                "name": "Frontend",
                "type": "frontend",
                "replicas": 1,
                "podTemplate": {
                    "spec": {
                        "containers": [
                            {"name": "main", "image": "fe:1", "args": ["--http-port", "8000"]}
                        ]
                    }
                },
            }
        ]
    },
}


def mutated(path: list, value) -> dict:
    doc = copy.deepcopy(VALID)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def test_a_minimal_valid_graph_passes() -> None:
    assert dgd_errors(VALID) == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["spec", "components", 0, "type"], "backend", "is not one of"),
        (["spec", "components", 0, "replicas"], -1, "less than the minimum"),
        (["spec", "components", 0, "name"], "bad name", "does not match"),
        (["spec", "components", 0, "replica"], 1, "Additional properties"),
        (["spec", "components", 0, "runtimeVersionOverride"], "1.6", "does not match"),
        (["spec", "components", 0, "podTemplate", "spec", "containers", 0, "imagee"], "x", ""),
        (["spec", "components", 0, "podTemplate", "spec", "containers", 0, "name"], "app", "main"),
        (["spec", "components", 0, "podTemplate", "spec", "terminationGracePeriod"], 9, ""),
        (["spec", "services"], {}, "Additional properties"),
        (["apiVersion"], "nvidia.com/v1alpha1", "v1beta1"),
    ],
)
def test_what_the_crd_refuses_is_reported(path: list, value, expected: str) -> None:
    errors = dgd_errors(mutated(path, value))
    assert errors and any(expected in e for e in errors), errors


def test_duplicate_component_names_are_refused() -> None:
    doc = copy.deepcopy(VALID)
    doc["spec"]["components"].append({**doc["spec"]["components"][0], "name": "frontend"})
    assert any("unique" in e for e in dgd_errors(doc))
