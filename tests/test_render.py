"""Render matrix: every engine_kind x accelerator x disagg_roles x request_plane (16 renders,
each once, shared by all checks through a module-scoped fixture), plus the examples and the
vendored runtime's manifest.

Per render: no Jinja left (in names or contents), no odd characters in file names, YAML /
TOML / JSON parse, every Python file compiles, ruff check and ruff format --check pass with
the generated project's own configuration, the vendored runtime is byte-identical to
template/src/backend_common, and each answer shows up where it should.
"""

from __future__ import annotations

import filecmp
import itertools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from generator.examples import diff_examples
from generator.manifest import RUNTIME_DIR, check_manifest, runtime_files
from generator.render import render_snapshot, snapshot

AXES = {
    "engine_kind": ["skeleton", "mocker"],
    "accelerator": ["cpu", "cuda"],
    "disagg_roles": ["agg", "agg,prefill,decode"],
    "request_plane": ["tcp", "nats"],
}
COMBOS = [dict(zip(AXES, values, strict=True)) for values in itertools.product(*AXES.values())]
# The remaining answers vary along the matrix instead of multiplying it.
PYTHONS = ["3.11", "3.12"]
LICENSES = ["Apache-2.0", "MIT", "Proprietary"]
# GitHub Actions expressions (${{ ... }}) are meant to survive rendering.
LEFTOVER = re.compile(r"(?<!\$)\{\{|\{%|\{#")


def combo_id(combo: dict[str, str]) -> str:
    return "-".join(v.replace(",", "+") for v in combo.values())


def answers_for(index: int, combo: dict[str, str]) -> dict[str, str]:
    return {
        **combo,
        "project_name": f"backend-{index}",
        "python_version": PYTHONS[index % len(PYTHONS)],
        "license": LICENSES[index % len(LICENSES)],
        "author_name": "Test Author",
        "author_email": "test@example.com",
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, str]]]:
    src = snapshot(tmp_path_factory.mktemp("snapshot"))
    out = tmp_path_factory.mktemp("renders")
    projects = {}
    for index, combo in enumerate(COMBOS):
        data = answers_for(index, combo)
        projects[combo_id(combo)] = (render_snapshot(src, out / combo_id(combo), data), data)
    return projects


def files(project: Path) -> list[Path]:
    return sorted(p for p in project.rglob("*") if p.is_file())


def own_files(project: Path) -> list[Path]:
    """Everything but the vendored runtime (checked byte for byte on its own)."""
    runtime = project / "src" / "backend_common"
    return [p for p in files(project) if runtime not in p.parents]


def ruff() -> str:
    candidate = Path(sys.executable).parent / "ruff"
    return str(candidate) if candidate.exists() else (shutil.which("ruff") or "ruff")


def hadolint() -> str:
    candidate = Path(sys.executable).parent / "hadolint"
    return str(candidate) if candidate.exists() else (shutil.which("hadolint") or "hadolint")


IDS = [combo_id(c) for c in COMBOS]


@pytest.mark.parametrize("key", IDS)
def test_no_jinja_left(rendered, key: str) -> None:
    project, _data = rendered[key]
    leftovers = [
        str(p.relative_to(project))
        for p in own_files(project)
        if LEFTOVER.search(p.read_text(encoding="utf-8"))
    ]
    assert leftovers == []
    names = [str(p.relative_to(project)) for p in project.rglob("*")]
    assert [n for n in names if ".jinja" in n or "{" in n or '"' in n or "|" in n] == []


@pytest.mark.parametrize("key", IDS)
def test_data_files_parse(rendered, key: str) -> None:
    project, _data = rendered[key]
    parsed = 0
    for path in files(project):
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yml", ".yaml"):
            yaml.safe_load(text)
        elif path.suffix == ".toml":
            tomllib.loads(text)
        elif path.suffix == ".json":
            json.loads(text)
        else:
            continue
        parsed += 1
    # answers, CI workflow, compose, pyproject, the runtime's manifest
    assert parsed >= 5


@pytest.mark.parametrize("key", IDS)
def test_python_compiles(rendered, key: str) -> None:
    project, _data = rendered[key]
    for path in files(project):
        if path.suffix == ".py":
            compile(path.read_text(encoding="utf-8"), str(path), "exec")


@pytest.mark.parametrize("key", IDS)
def test_ruff_passes_with_the_projects_own_config(rendered, key: str) -> None:
    project, _data = rendered[key]
    for argv in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        out = subprocess.run(
            [ruff(), *argv], cwd=project, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, f"ruff {' '.join(argv)}:\n{out.stdout}{out.stderr}"


@pytest.mark.parametrize("key", IDS)
def test_hadolint_finds_nothing_in_any_dockerfile(rendered, key: str) -> None:
    """Every Dockerfile, the CUDA ones included (they cannot be built on this machine)."""
    project, _data = rendered[key]
    dockerfiles = sorted(p.name for p in project.glob("Dockerfile*"))
    assert {"Dockerfile", "Dockerfile.frontend"} <= set(dockerfiles)
    # No .hadolint.yaml anywhere: the default rules, every severity (info included).
    out = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", *dockerfiles],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


@pytest.mark.parametrize("key", IDS)
def test_vendored_runtime_is_byte_identical(rendered, key: str) -> None:
    project, _data = rendered[key]
    vendored = project / "src" / "backend_common"
    assert runtime_files(vendored) == runtime_files(RUNTIME_DIR)
    for rel in [*runtime_files(RUNTIME_DIR), "MANIFEST.json"]:
        assert filecmp.cmp(vendored / rel, RUNTIME_DIR / rel, shallow=False), rel


@pytest.mark.parametrize("key", IDS)
def test_answers_land_where_they_should(rendered, key: str) -> None:
    project, data = rendered[key]
    package = project / "src" / data["project_name"].replace("-", "_")
    mocker = data["engine_kind"] == "mocker"
    for name in ("__init__.py", "__main__.py", "args.py", "errors.py", "guard.py", "engine.py"):
        assert (package / name).is_file(), name
    assert (package / "mocker").is_dir() == mocker
    assert (project / "tests" / "test_engine.py").is_file() == (not mocker)

    answers = yaml.safe_load((project / ".copier-answers.yml").read_text(encoding="utf-8"))
    assert {k: answers[k] for k in data} == data

    pyproject = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["requires-python"] == f">={data['python_version']}"
    assert any(d.startswith("torch") for d in pyproject["project"]["dependencies"]) == mocker
    makefile = (project / "Makefile").read_text(encoding="utf-8")
    assert ("pip install -q $(TORCH_CPU)" in makefile) == mocker
    assert "-include local.mk" in makefile

    dockerfile = (project / "Dockerfile").read_text(encoding="utf-8")
    if data["accelerator"] == "cuda":
        assert dockerfile.startswith("# ") and "FROM nvidia/cuda:" in dockerfile
    else:
        assert f"FROM python:{data['python_version']}-slim" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "USER 10001:10001" in dockerfile

    compose = yaml.safe_load((project / "docker-compose.yml").read_text(encoding="utf-8"))
    assert set(compose["services"]) == {"nats-server", "etcd-server", "frontend", "backend"}
    backend = compose["services"]["backend"]
    assert backend["environment"]["DYN_REQUEST_PLANE"].endswith(f"{data['request_plane']}}}")
    assert ("deploy" in backend) == (data["accelerator"] == "cuda")

    args = (package / "args.py").read_text(encoding="utf-8")
    assert f'DEFAULT_REQUEST_PLANE = "{data["request_plane"]}"' in args
    assert json.dumps(data["disagg_roles"].split(",")) in args
    assert (project / "LICENSE").is_file() == (data["license"] != "Proprietary")


def test_matrix_covers_every_combination() -> None:
    assert len(COMBOS) == 16 == len(set(IDS))


def test_runtime_manifest_is_current() -> None:
    assert check_manifest() == [], "run: python -m generator manifest"


def test_examples_match_a_fresh_render() -> None:
    assert diff_examples() == [], "run: python -m generator examples"
