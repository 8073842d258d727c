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

The third updates from the previous release (``PREVIOUS_RELEASE``) to the working tree for a
project of every engine kind with an edit in its ``engine.py``: the update applies cleanly,
``engine.py`` stays exactly the user's (it is in ``_skip_if_exists``, also where the new
template would render it differently: the transformers kind's 217-line engine), the new
template-owned files are there and the old ones gone, and what the user's ``engine.py``
imports from template-owned code still exists.
"""

from __future__ import annotations

import ast
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
# The files copier.yml's _skip_if_exists keeps, and the answers: an update leaves them alone.
USER_OWNED = {
    "src/upd_backend/engine.py",
    "tests/test_engine.py",
    "local.mk",
    ".copier-answers.yml",
}
# The last commit whose vendored runtime kept the worker's machinery at the package's top level.
FLAT_LAYOUT_COMMIT = "8c16c5c"
# The release before settings became a package and every engine kind's logic template-owned.
PREVIOUS_RELEASE = "a7fb86f"
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


def _release_to_current_repo(tmp_path: Path, commit: str, what: str) -> Path:
    """A template repository: ``commit``'s template as tag 0.1.0, the working tree as 0.2.0."""
    if not _has_commit(commit):
        if os.environ.get("CI"):
            pytest.fail(f"commit {commit} is missing: CI needs the full history")
        pytest.skip(f"commit {commit} is not in this clone (shallow?)")
    repo = tmp_path / "template-repo"
    repo.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "copier.yml", "template"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(repo, filter="data")
    git(repo, "init", "-q")
    commit_all(repo, what, "0.1.0")
    git(repo, "rm", "-r", "-q", "template", "copier.yml")
    snapshot(repo)
    commit_all(repo, "the working tree", "0.2.0")
    return repo


@pytest.fixture
def flat_to_current_repo(tmp_path: Path) -> Path:
    return _release_to_current_repo(tmp_path, FLAT_LAYOUT_COMMIT, "flat runtime layout")


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


# Per kind: an edit of the generated engine.py (text as generated -> the user's version).
USER_EDITS = {
    "skeleton": ("DEFAULT_MAX_TOKENS = 16", "DEFAULT_MAX_TOKENS = 32  # my engine"),
    "mocker": ("return cli.from_args(argv, cls)", "return cli.from_args(argv, cls)  # my engine"),
    "transformers": ("SNAPSHOT_INTERVAL_S = 0.1", "SNAPSHOT_INTERVAL_S = 0.2  # my engine"),
}
# Template-owned files the current release has and the previous one did not, and the reverse.
NEW_FILES = {
    "src/backend_common/args/table.py",
    "src/backend_common/args/engine_args.py",
    "src/backend_common/request_policy.py",
}
GONE_FILES = {
    "src/backend_common/args.py",
    "src/backend_common/flags.py",
    "src/backend_common/runtime/request_policy.py",
}
NEW_BY_KIND = {"transformers": {"src/upd_backend/hf/engine.py"}}
# Kinds whose engine needs torch and a model to run; this repository's environment has neither
# (the generated project's own tests run them).
TORCH_KINDS = {"transformers"}


def _relative_imports(source: str) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from .x import a, b`` in ``source``."""
    return [
        ("." * node.level + (node.module or ""), [a.name for a in node.names])
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.level
    ]


def _top_level_names(path: Path) -> set[str]:
    """Names a module binds at top level (definitions, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _assert_imports_resolve(engine: Path) -> None:
    """Every ``from .x import name`` of the user's engine.py names something that exists."""
    package = engine.parent
    for module, names in _relative_imports(engine.read_text(encoding="utf-8")):
        parts = module.lstrip(".").split(".") if module.strip(".") else []
        target = package.joinpath(*parts)
        if target.is_dir() or not parts:
            for name in names:  # from . import x / from .pkg import module
                assert (
                    (target / f"{name}.py").is_file()
                    or (target / name).is_dir()
                    or (name in _top_level_names(target / "__init__.py"))
                ), f"{engine.name}: from {module} import {name}"
            continue
        source = target.with_suffix(".py")
        assert source.is_file(), f"{engine.name}: {module} is gone"
        missing = set(names) - _top_level_names(source)
        assert not missing, f"{engine.name}: from {module} import {sorted(missing)}: gone"


@pytest.mark.parametrize("kind", sorted(USER_EDITS))
def test_update_from_the_previous_release_for_every_kind(tmp_path: Path, kind: str) -> None:
    repo = _release_to_current_repo(tmp_path, PREVIOUS_RELEASE, "previous release")
    data = {**DATA, "engine_kind": kind}
    project = tmp_path / "project"
    run_copy(str(repo), project, data=data, vcs_ref="0.1.0", defaults=True, quiet=True)
    git(project, "init", "-q")
    commit_all(project, "generated at the previous release")
    engine = project / "src" / "upd_backend" / "engine.py"
    generated, edited = USER_EDITS[kind]
    text = engine.read_text(encoding="utf-8")
    assert generated in text, f"{kind}: the edit's anchor is not in the generated engine.py"
    engine.write_text(text.replace(generated, edited), encoding="utf-8")
    commit_all(project, "my engine")
    users_engine = engine.read_text(encoding="utf-8")

    run_update(project, data=data, defaults=True, overwrite=True, quiet=True)

    status = git(project, "status", "--porcelain")
    assert not [line for line in status.splitlines() if line[:2] in ("UU", "AA", "DU", "UD")]
    assert not list(project.rglob("*.rej"))
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            text = path.read_text(encoding="utf-8", errors="replace")
            assert "<<<<<<< " not in text, f"conflict markers in {path}"
    # engine.py is the user's, byte for byte, and still imports only what exists.
    assert engine.read_text(encoding="utf-8") == users_engine
    _assert_imports_resolve(engine)
    # The new template-owned files are in, the old ones out, and the rest as rendered fresh.
    for rel in NEW_FILES | NEW_BY_KIND.get(kind, set()):
        assert (project / rel).is_file(), rel
    for rel in GONE_FILES:
        assert not (project / rel).exists(), rel
    fresh = tmp_path / "fresh"
    run_copy(str(repo), fresh, data=data, vcs_ref="0.2.0", defaults=True, quiet=True)
    differing = [rel for rel in diff_trees(fresh, project) if not rel.startswith(".git/")]
    assert sorted(set(differing) - USER_OWNED) == []
    if kind in TORCH_KINDS:
        return  # its engine needs torch and a model: the imports above are what is checked
    # The user's engine passes the conformance kit on the updated runtime.
    probe = (
        "import asyncio\n"
        "from backend_common.testing import run_conformance\n"
        "from upd_backend.engine import UpdBackendEngine\n"
        "asyncio.run(run_conformance(lambda: UpdBackendEngine.from_args([])[0]))\n"
        "print('conformant')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "conformant", out.stderr
