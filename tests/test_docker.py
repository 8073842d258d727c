"""The generated images, built and run: ``make docker-check`` of generated projects.

* Without a Docker daemon the check says so and exits 2 (it is a check, never a silent pass).
* With a daemon (``.ci/run`` starts one): the skeleton example and its disaggregated render
  (one prefill and one decode container) each build their backend and frontend images and
  pass ``make docker-check``: healthy by the image's HEALTHCHECK, uid 10001, a chat through
  the real frontend, exit code 0 within the compose stop grace after ``docker stop``.
  In CI (``CI=true``) a missing daemon fails these tests instead of skipping them.

The CUDA image cannot be built here (no ``nvidia/cuda`` base image); test_render.py lints
every Dockerfile of the render matrix with hadolint instead.
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

REPO = Path(__file__).resolve().parent.parent
CHECK_SCRIPT = REPO / "template" / "scripts" / "docker_check.py"
CHECK_TIMEOUT_S = 1800
# Variables of an enclosing `make` that would leak into the generated project's make.
_MAKE_VARS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VIRTUAL_ENV")

PROJECTS = {
    "skeleton-cpu": EXAMPLES["skeleton-cpu"],
    "skeleton-disagg": {
        **EXAMPLES["skeleton-cpu"],
        "project_name": "skeleton-disagg",
        "disagg_roles": "agg,prefill,decode",
    },
}


def _answers(cli: str) -> bool:
    try:
        out = subprocess.run([cli, "info"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def _builds_with_buildkit(cli: str) -> bool:
    """buildx present, or a CLI older than 23 (whose DOCKER_BUILDKIT=1 needs no plugin)."""
    run = {"capture_output": True, "text": True, "timeout": 30, "check": False}
    if subprocess.run([cli, "buildx", "version"], **run).returncode == 0:
        return True
    version = subprocess.run([cli, "version", "--format", "{{.Client.Version}}"], **run).stdout
    major = re.match(r"\d+", version.strip())
    return bool(major) and int(major.group()) < 23


def docker_clis() -> list[str]:
    """Every ``docker`` executable on PATH, in PATH order."""
    seen: list[str] = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "docker"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            real = str(candidate.resolve())
            if real not in seen:
                seen.append(real)
    return seen


@pytest.fixture(scope="module")
def docker_cli() -> str:
    """A docker CLI that reaches a daemon and builds with BuildKit; skip (fail in CI) if none."""
    clis = docker_clis()
    answering = [cli for cli in clis if _answers(cli)]
    usable = [cli for cli in answering if _builds_with_buildkit(cli)]
    if usable:
        return usable[0]
    if not answering:
        why = f"no Docker daemon answers (DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unset')})"
    else:
        why = f"no docker CLI builds with BuildKit among {answering} (install docker-buildx)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; .ci/run starts one before the tests")
    pytest.skip(f"{why}: make docker-check needs one")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return snapshot(tmp_path_factory.mktemp("snapshot"))


def python_for_projects() -> str:
    return os.environ.get("PYTHON") or shutil.which("python3.11") or sys.executable


def test_check_without_a_daemon_says_so_and_fails(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock",
        "PYTHONPATH": str(REPO / "template" / "src"),
    }
    if not docker_clis():
        env["DOCKER"] = str(tmp_path / "docker")  # not there: the check names the missing CLI
    out = subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), "--image", "x:1", "--frontend-image", "y:1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert re.search(r"no Docker daemon answers|no docker CLI", out.stderr), out.stderr


@pytest.mark.slow
@pytest.mark.timeout(CHECK_TIMEOUT_S + 60)
@pytest.mark.parametrize("name", list(PROJECTS))
def test_make_docker_check_passes(docker_cli: str, src: Path, tmp_path: Path, name: str) -> None:
    project = render_snapshot(src, tmp_path / name, PROJECTS[name])
    env = {k: v for k, v in os.environ.items() if k not in _MAKE_VARS}
    env["DOCKER"] = docker_cli
    out = subprocess.run(
        [
            "make",
            "docker-check",
            f"PYTHON={python_for_projects()}",
            f"IMAGE=docker-check-{name}:latest",
            f"FRONTEND_IMAGE=docker-check-{name}-frontend:latest",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
    )
    report = out.stdout[-6000:] + out.stderr[-6000:]
    assert out.returncode == 0, f"make docker-check failed:\n{report}"
    assert "docker-check: OK" in out.stdout, report
    roles = ["prefill", "decode"] if "prefill" in PROJECTS[name]["disagg_roles"] else ["agg"]
    for role in roles:
        assert re.search(rf"uid docker-check-\d+-{role}\s+10001", out.stdout), report
        assert re.search(rf"stop docker-check-\d+-{role}\s+[\d.]+ s \(exit 0", out.stdout), report
    print(out.stdout)
