"""``copier update`` from one template release to the next keeps user work and merges cleanly.

A throw-away git repository of this template gets tag 0.1.0, then a change to template-owned
files (a Makefile target, a README line, a vendored runtime file with its manifest) as tag
0.2.0. A project copied at 0.1.0 and committed gets user edits in its user-owned files
(engine.py, local.mk), then ``run_update`` to the newest tag. Expected: no conflicts, the
user edits intact, and every template-owned file equal to a fresh copy at 0.2.0.

The second test updates from a real earlier release of this repository: the commit before the
runtime's machinery moved into ``backend_common/runtime/`` (``FLAT_LAYOUT_COMMIT``), to the
working tree. Files the new layout no longer has must disappear, and the engine (user-owned,
with the user's edit) must still import and run against the new runtime.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
import yaml
from copier import run_copy, run_update

from generator.examples import diff_trees
from generator.manifest import write_manifest
from generator.render import REPO_ROOT, snapshot

DATA = {"project_name": "upd-backend", "author_name": "T", "author_email": "t@example.com"}
USER_OWNED = {"src/upd_backend/engine.py", "local.mk", ".copier-answers.yml"}
# The last commit whose vendored runtime kept the worker's machinery at the package's top level.
FLAT_LAYOUT_COMMIT = "8c16c5c"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


def git(repo: Path, *argv: str) -> str:
    out = subprocess.run(
        ["git", *argv],
        cwd=repo,
        env={**os.environ, **GIT_ENV},
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


def commit_all(repo: Path, message: str, tag: str | None = None) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    if tag:
        git(repo, "tag", tag)


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


@pytest.fixture
def template_repo(tmp_path: Path) -> Path:
    repo = snapshot(tmp_path / "template-repo")
    git(repo, "init", "-q")
    commit_all(repo, "release 0.1.0", "0.1.0")
    makefile = repo / "template" / "Makefile.jinja"
    text = makefile.read_text(encoding="utf-8")
    makefile.write_text(
        text.replace(
            "-include local.mk",
            "version: ## print the project version\n\t@grep -m1 '^version' pyproject.toml\n\n"
            "-include local.mk",
        ),
        encoding="utf-8",
    )
    append(repo / "template" / "README.md.jinja", "\nChanged in 0.2.0.\n")
    runtime = repo / "template" / "src" / "backend_common"
    append(runtime / "errors.py", "\n# runtime change shipped in 0.2.0\n")
    write_manifest(runtime)
    commit_all(repo, "release 0.2.0", "0.2.0")
    return repo


def test_update_keeps_user_edits_and_matches_a_fresh_copy(
    template_repo: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    run_copy(str(template_repo), project, data=DATA, vcs_ref="0.1.0", defaults=True, quiet=True)
    git(project, "init", "-q")
    commit_all(project, "generated at 0.1.0")
    assert yaml.safe_load((project / ".copier-answers.yml").read_text())["_commit"] == "0.1.0"

    engine = project / "src" / "upd_backend" / "engine.py"
    engine.write_text(
        engine.read_text(encoding="utf-8").replace(
            "DEFAULT_MAX_TOKENS = 16", "DEFAULT_MAX_TOKENS = 32  # my engine"
        ),
        encoding="utf-8",
    )
    append(project / "local.mk", "\nmine: ## my own target\n\t@echo mine\n")
    commit_all(project, "my engine")

    run_update(project, data=DATA, defaults=True, overwrite=True, quiet=True)

    status = git(project, "status", "--porcelain")
    assert not [line for line in status.splitlines() if line[:2] in ("UU", "AA", "DU", "UD")]
    assert not list(project.rglob("*.rej"))
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            text = path.read_text(encoding="utf-8", errors="replace")
            assert "<<<<<<< " not in text, f"conflict markers in {path}"

    # User-owned files kept the user's edits.
    assert "DEFAULT_MAX_TOKENS = 32  # my engine" in engine.read_text(encoding="utf-8")
    assert "mine: ## my own target" in (project / "local.mk").read_text(encoding="utf-8")
    assert yaml.safe_load((project / ".copier-answers.yml").read_text())["_commit"] == "0.2.0"

    # Template-owned files are exactly what 0.2.0 renders.
    fresh = tmp_path / "fresh"
    run_copy(str(template_repo), fresh, data=DATA, vcs_ref="0.2.0", defaults=True, quiet=True)
    differing = [rel for rel in diff_trees(fresh, project) if not rel.startswith(".git/")]
    assert sorted(set(differing) - USER_OWNED) == []
    assert "version: ## print the project version" in (project / "Makefile").read_text()
    assert (
        "runtime change shipped in 0.2.0"
        in (project / "src" / "backend_common" / "errors.py").read_text()
    )


def test_update_reaches_the_mocker_engine_code_and_keeps_the_users_engine_py(
    tmp_path: Path,
) -> None:
    """The mocker's engine lives in the template-owned ``mocker/`` package: a template fix
    there reaches a project on ``copier update``, while the user's ``engine.py`` (a small
    subclass) keeps its edits."""
    repo = snapshot(tmp_path / "template-repo")
    git(repo, "init", "-q")
    commit_all(repo, "release 0.1.0", "0.1.0")
    (mocker_engine,) = [
        p for p in (repo / "template" / "src").rglob("engine.py") if "mocker" in p.parent.name
    ]
    append(mocker_engine, "\n# mocker fix shipped in 0.2.0\n")
    commit_all(repo, "release 0.2.0", "0.2.0")

    data = {**DATA, "engine_kind": "mocker"}
    project = tmp_path / "project"
    run_copy(str(repo), project, data=data, vcs_ref="0.1.0", defaults=True, quiet=True)
    git(project, "init", "-q")
    commit_all(project, "generated at 0.1.0")
    engine = project / "src" / "upd_backend" / "engine.py"
    assert len(engine.read_text(encoding="utf-8").splitlines()) < 40  # small, like skeleton's
    append(engine, "\n# my engine tweak\n")
    commit_all(project, "my engine")

    run_update(project, data=data, defaults=True, overwrite=True, quiet=True)

    assert "# my engine tweak" in engine.read_text(encoding="utf-8")
    shipped = project / "src" / "upd_backend" / "mocker" / "engine.py"
    assert "# mocker fix shipped in 0.2.0" in shipped.read_text(encoding="utf-8")


def test_update_refuses_to_switch_the_engine(template_repo: Path, tmp_path: Path) -> None:
    """engine.py and tests/test_engine.py are the user's: an update cannot swap the engine."""
    project = tmp_path / "project"
    run_copy(str(template_repo), project, data=DATA, vcs_ref="0.1.0", defaults=True, quiet=True)
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["engine_kind_at_generation"] == "skeleton"
    git(project, "init", "-q")
    commit_all(project, "generated at 0.1.0")
    before = git(project, "rev-parse", "HEAD")

    with pytest.raises(ValueError) as info:
        run_update(
            project,
            data={**DATA, "engine_kind": "mocker"},
            defaults=True,
            overwrite=True,
            quiet=True,
        )
    message = str(info.value)
    assert "engine_kind cannot be changed by `copier update`" in message
    assert '"skeleton"' in message and "Switching engines" in message
    # Nothing was touched.
    assert git(project, "status", "--porcelain") == ""
    assert git(project, "rev-parse", "HEAD") == before
    assert (project / "tests" / "test_engine.py").is_file()

    # An update that keeps the engine still works, and keeps the record.
    run_update(project, data=DATA, defaults=True, overwrite=True, quiet=True)
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["engine_kind_at_generation"] == "skeleton"
    assert answers["_commit"] == "0.2.0"


def _has_commit(commit: str) -> bool:
    probe = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO_ROOT, capture_output=True
    )
    return probe.returncode == 0


@pytest.fixture
def flat_to_current_repo(tmp_path: Path) -> Path:
    if not _has_commit(FLAT_LAYOUT_COMMIT):
        if os.environ.get("CI"):
            pytest.fail(f"commit {FLAT_LAYOUT_COMMIT} is missing: CI needs the full history")
        pytest.skip(f"commit {FLAT_LAYOUT_COMMIT} is not in this clone (shallow?)")
    repo = tmp_path / "template-repo"
    repo.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", FLAT_LAYOUT_COMMIT, "copier.yml", "template"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(repo, filter="data")
    git(repo, "init", "-q")
    commit_all(repo, "flat runtime layout", "0.1.0")
    git(repo, "rm", "-r", "-q", "template", "copier.yml")
    snapshot(repo)
    commit_all(repo, "runtime machinery under backend_common/runtime", "0.2.0")
    return repo


def test_update_from_the_flat_runtime_layout(flat_to_current_repo: Path, tmp_path: Path) -> None:
    repo = flat_to_current_repo
    project = tmp_path / "project"
    run_copy(str(repo), project, data=DATA, vcs_ref="0.1.0", defaults=True, quiet=True)
    runtime = project / "src" / "backend_common"
    assert (runtime / "worker.py").is_file() and not (runtime / "runtime").exists()
    git(project, "init", "-q")
    commit_all(project, "generated at 0.1.0")
    engine = project / "src" / "upd_backend" / "engine.py"
    engine.write_text(
        engine.read_text(encoding="utf-8").replace(
            "DEFAULT_MAX_TOKENS = 16", "DEFAULT_MAX_TOKENS = 32  # my engine"
        ),
        encoding="utf-8",
    )
    commit_all(project, "my engine")

    run_update(project, data=DATA, defaults=True, overwrite=True, quiet=True)

    status = git(project, "status", "--porcelain")
    assert not [line for line in status.splitlines() if line[:2] in ("UU", "AA", "DU", "UD")]
    assert not list(project.rglob("*.rej"))
    assert "DEFAULT_MAX_TOKENS = 32  # my engine" in engine.read_text(encoding="utf-8")
    # The old top-level machinery is gone; the new layout is in place.
    for moved in ("worker.py", "adapter.py", "runner.py", "status.py", "nats_options.py"):
        assert not (runtime / moved).exists(), moved
    assert (runtime / "runtime" / "worker.py").is_file()
    fresh = tmp_path / "fresh"
    run_copy(str(repo), fresh, data=DATA, vcs_ref="0.2.0", defaults=True, quiet=True)
    differing = [rel for rel in diff_trees(fresh, project) if not rel.startswith(".git/")]
    assert sorted(set(differing) - USER_OWNED) == []

    # The user's engine (written against the old layout) imports and runs on the new runtime.
    probe = (
        "import asyncio, backend_common\n"
        "from backend_common.testing import collect, standard_request\n"
        "from upd_backend.engine import DEFAULT_MAX_TOKENS, UpdBackendEngine\n"
        "engine, config = UpdBackendEngine.from_args([])\n"
        "async def main():\n"
        "    await engine.start(1)\n"
        "    items = await collect(engine, standard_request('m', max_tokens=2))\n"
        "    await engine.cleanup()\n"
        "    return items[-1].finish_reason.value\n"
        "assert DEFAULT_MAX_TOKENS == 32 and callable(backend_common.run)\n"
        "print(asyncio.run(main()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project / "src")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == "length", out.stderr
