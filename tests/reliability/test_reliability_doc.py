"""docs/reliability.md's results table is generated from docs/reliability-results.json, the
committed copy of what the reliability tests recorded (tests/reliability_results.py): the two
must agree, and every test that records figures must have its figures there."""

from __future__ import annotations

import json
import re

from reliability_results import COMMITTED, DOC, REPO, render, section

# Recorded under a computed name, so the pattern below does not see them.
COMPUTED_NAMES = {"soak", "chaos"}
RECORDING_FILES = ("test_reliability_*.py", "test_shutdown_deadline.py")


def test_doc_table_matches_committed_results() -> None:
    results = json.loads(COMMITTED.read_text())
    assert section(DOC.read_text()) == render(results), (
        "docs/reliability.md is stale: run the reliability tests, then `make reliability-doc`"
    )


def test_every_recording_test_has_committed_results() -> None:
    names = set(COMPUTED_NAMES)
    for pattern in RECORDING_FILES:
        for path in (REPO / "tests" / "reliability").glob(pattern):
            names |= set(re.findall(r'record\(\s*"(\w+)"', path.read_text()))
    results = json.loads(COMMITTED.read_text())
    assert names - set(results) == set(), "no committed figures for these tests"
    for name, data in results.items():
        assert data["bounds"] and data["summary"], name
