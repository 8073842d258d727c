"""The generated project's own ``make lint test`` passes on a fresh checkout (slow).

Each example combination is rendered into a temporary directory, committed to a new git
repository and built exactly as its README says: ``make lint test`` creates ``.venv``,
installs the project with its test extra and runs all its tests, the end-to-end ones
through the real frontend included. Nothing from this repository's environment is used but
the Python interpreter (``$PYTHON``, else python3.11), pip's ordinary download cache and
the real frontend's virtual environment (``DYNAMO_FRONTEND_PYTHON``, shared instead of
installed once per project). A skipped test fails this test: ``make test`` means everything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from generator.examples import EXAMPLES
from generator.render import render_snapshot, snapshot

pytestmark = pytest.mark.slow

MAKE_TIMEOUT_S = 900
# vllm-cpu: installing vLLM (3.5 GB) and the engine starts of its tests take longer.
MAKE_TIMEOUT_S_BY_EXAMPLE = {"vllm-cpu": 2400}
# Variables of an enclosing `make` that would leak into the generated project's make.
_MAKE_VARS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VIRTUAL_ENV")


def python_for_projects() -> str:
    return os.environ.get("PYTHON") or shutil.which("python3.11") or sys.executable


def git(project: Path, *argv: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    subprocess.run(["git", *argv], cwd=project, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return snapshot(tmp_path_factory.mktemp("snapshot"))


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_generated_project_passes_its_own_make_lint_test(
    src: Path, tmp_path: Path, example: str, frontend_python: str
) -> None:
    project = render_snapshot(src, tmp_path / example, EXAMPLES[example])
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated")
    env = {k: v for k, v in os.environ.items() if k not in _MAKE_VARS}
    env["DYNAMO_FRONTEND_PYTHON"] = frontend_python
    out = subprocess.run(
        ["make", "lint", "test", f"PYTHON={python_for_projects()}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=MAKE_TIMEOUT_S_BY_EXAMPLE.get(example, MAKE_TIMEOUT_S),
    )
    assert out.returncode == 0, (
        f"make lint test failed:\n{out.stdout[-6000:]}\n{out.stderr[-4000:]}"
    )
    summary = out.stdout.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary), summary
    # Nothing skipped, deselected or expected to fail: the e2e tests ran too. (Warnings, which
    # vLLM's own imports raise, do not hide a test.)
    assert re.fullmatch(r"=*\s*\d+ passed(, \d+ warnings?)? in [\d.]+s( \(.*\))?\s*=*", summary), (
        summary
    )
    e2e = subprocess.run(
        [".venv/bin/python", "-m", "pytest", "-q", "--collect-only", "-m", "e2e"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # ...and there are e2e tests to run (one node id per line).
    e2e_tests = [line for line in e2e.stdout.splitlines() if "::" in line]
    assert len(e2e_tests) >= 3, e2e.stdout[-2000:]
    # Building and testing left the checkout clean: everything it made is git-ignored.
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True, check=True
    )
    assert status.stdout == ""
