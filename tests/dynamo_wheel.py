"""Dynamo 1.6.1's own Python backend package, read from the frontend venv's ``ai-dynamo`` wheel.

The compatibility tests run code nobody here wrote: the wheel's
``dynamo/common/backend/sample_engine.py`` and its unit tests, unmodified, with their
``dynamo.*`` imports resolved to ``backend_common.dynamo_compat`` (``aliases``) in this
repository's own ``.venv``, where no ``dynamo`` package is installed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SAMPLE_ENGINE = "dynamo.common.backend.sample_engine:SampleLLMEngine"


def backend_dir(frontend_python: str) -> Path:
    """``<site-packages>/dynamo/common/backend`` of the frontend venv (not imported there)."""
    out = subprocess.run(
        [frontend_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    path = Path(out.stdout.strip()) / "dynamo" / "common" / "backend"
    if not (path / "sample_engine.py").is_file():
        pytest.fail(f"the frontend venv has no Dynamo backend package at {path}")
    return path
