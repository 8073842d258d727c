"""The README's main command: generate a backend and chat with it through the real frontend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e


def test_demo_generates_a_backend_that_answers_through_the_frontend(
    frontend_python: str, tmp_path
) -> None:
    dest = tmp_path / "demo-backend"
    result = subprocess.run(
        [sys.executable, "-m", "generator", "demo", "--dest", str(dest)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DYNAMO_FRONTEND_PYTHON": frontend_python},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "The generated backend answered through the real frontend." in result.stdout
    assert '"finish_reason": "length"' in result.stdout
    assert (dest / "src" / "demo_backend" / "engine.py").is_file()
