"""A generated project's ``make bench`` / ``make aiperf``: aiperf against its own worker.

A full aiperf sweep takes minutes on two cores (and a 1.2 GB environment), so this checks the
wiring instead, on freshly rendered projects: the make targets run ``scripts/aiperf_bench.py``
and ``make install`` never installs aiperf; ``--dry-run`` prints one aiperf command per level
of the sweep, with the project's model directory as tokenizer and the server's token counts;
and aiperf is reported as to be installed on first use until ``.venv-aiperf`` holds it at the
pinned version (a stand-in environment plays the installed one).
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from generator.render import render_snapshot, snapshot

RENDERS = {
    "mocker": {"engine_kind": "mocker", "request_plane": "tcp"},
    "skeleton-nats": {"engine_kind": "skeleton", "request_plane": "nats"},
    "transformers": {"engine_kind": "transformers", "request_plane": "tcp"},
}
AIPERF_VERSION = "0.13.0"


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = snapshot(tmp_path_factory.mktemp("snapshot"))
    out = tmp_path_factory.mktemp("renders")
    base = {
        "author_name": "Test Author",
        "author_email": "test@example.com",
        "disagg_roles": "agg",
        "accelerator": "cpu",
    }
    return {
        key: render_snapshot(src, out / key, {**base, **answers, "project_name": f"bench-{key}"})
        for key, answers in RENDERS.items()
    }


def _make_dry(project: Path, target: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env["DYNAMO_FRONTEND_PYTHON"] = sys.executable  # any executable: nothing runs
    out = subprocess.run(
        ["make", "-n", target], cwd=project, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _dry_run(project: Path, *args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "DYNAMO_FRONTEND_PYTHON"}
    env["PYTHONPATH"] = str(project / "src")
    out = subprocess.run(
        [sys.executable, "scripts/aiperf_bench.py", "--dry-run", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("key", list(RENDERS))
def test_make_targets_run_the_aiperf_script_and_install_never_pulls_aiperf(
    projects: dict[str, Path], key: str
) -> None:
    project = projects[key]
    assert "scripts/aiperf_bench.py" in _make_dry(project, "aiperf")
    bench = _make_dry(project, "bench")
    if key == "transformers":  # keeps its own measurement; the aiperf sweep is `make aiperf`
        assert "scripts/bench.py" in bench
    else:
        assert "scripts/aiperf_bench.py" in bench
    install = _make_dry(project, "install")
    assert "aiperf" not in install
    assert ".venv-aiperf" in (project / "Makefile").read_text().split("clean:")[1]


@pytest.mark.parametrize("key", ["mocker", "skeleton-nats"])
def test_dry_run_prints_the_sweep_with_the_model_dir_as_tokenizer(
    projects: dict[str, Path], key: str
) -> None:
    project = projects[key]
    lines = _dry_run(project, "--concurrency", "1,8,32", "--requests", "20")
    assert lines[0] == f"aiperf=={AIPERF_VERSION} in .venv-aiperf: to be installed on first use"
    commands = [shlex.split(line) for line in lines[1:]]
    assert len(commands) == 3
    model_dir = project / ".run" / "bench" / "model"
    assert (model_dir / "tokenizer.json").is_file()
    for c, argv in zip((1, 8, 32), commands, strict=True):

        def value(flag: str, argv: list[str] = argv) -> str:
            return argv[argv.index(flag) + 1]

        assert argv[:2] == [".venv-aiperf/bin/aiperf", "profile"]
        assert value("--tokenizer") == str(model_dir.absolute())
        assert value("--concurrency") == str(c)
        assert value("--request-count") == str(max(20, 2 * c))
        assert value("--warmup-request-count") == str(c)
        assert value("--model") == "bench-model"
        assert "--use-server-token-count" in argv and "--streaming" in argv
        assert value("--artifact-dir").endswith(f".run/bench/aiperf/c{c}")


def _executable(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_an_installed_aiperf_is_reused(projects: dict[str, Path]) -> None:
    project = projects["mocker"]
    venv = project / ".venv-aiperf"
    _executable(venv / "bin" / "python", "print('0.12.0')\n")
    _executable(venv / "bin" / "aiperf", "")
    try:
        # Another version is not what the project pins: it would be installed over.
        assert _dry_run(project)[0].endswith("to be installed on first use")
        _executable(venv / "bin" / "python", f"print({AIPERF_VERSION!r})\n")
        lines = _dry_run(project)
        assert lines[0] == f"aiperf=={AIPERF_VERSION} in .venv-aiperf: installed"
        assert len(lines) == 4  # the default sweep: three levels
    finally:
        for name in ("python", "aiperf"):
            (venv / "bin" / name).unlink()
