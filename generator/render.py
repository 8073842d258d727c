"""Render projects from this repository's template (``copier.yml`` + ``template/``).

Two ways, for two purposes:

* ``render_for_user`` renders from the git repository itself (``vcs_ref="HEAD"``, which
  includes uncommitted changes), so the project records ``_src_path`` and ``_commit`` and
  ``copier update`` works later. Used by ``new``.
* ``render_snapshot`` renders from a plain copy of exactly the files git sees (tracked and
  untracked, minus ignored ones: the same set Copier's dirty-HEAD clone takes). No clone
  per render, and no commit id in the answers: deterministic output for ``examples`` and
  the render tests. Make one ``snapshot()`` and render it many times.

Answers are validated by Copier: a bad value raises ``ValueError("Validation error for
question ...")``.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from copier import run_copy

__all__ = [
    "ANSWERS_FILE",
    "REPO_ROOT",
    "normalize_answers",
    "parse_data",
    "render_for_user",
    "render_snapshot",
    "snapshot",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
ANSWERS_FILE = ".copier-answers.yml"
# Lines of the answers file that depend on where and from which commit a project was
# rendered; dropped from examples so they only change when the template does.
_VOLATILE_ANSWERS = ("_commit:", "_src_path:")


def parse_data(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` to a dict; a pair without ``=`` raises ``ValueError``."""
    data: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {pair!r}")
        data[key.strip()] = value
    return data


def _template_files(repo: Path) -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--"]
            + ["copier.yml", "template"],
            cwd=repo,
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        # Not a git checkout (e.g. an unpacked archive): every file but caches.
        return [
            p.relative_to(repo)
            for p in [repo / "copier.yml", *(repo / "template").rglob("*")]
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    names = [n for n in out.decode().split("\0") if n]
    return [Path(n) for n in names if (repo / n).is_file()]


def snapshot(dest: Path, repo: Path = REPO_ROOT) -> Path:
    """Copy the template's files (as git sees them) into ``dest``; return ``dest``."""
    for rel in _template_files(repo):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)
    return dest


def render_snapshot(src: Path, dst: Path, data: Mapping[str, Any]) -> Path:
    """Render the snapshot ``src`` into ``dst`` with ``data`` (other answers: defaults)."""
    run_copy(
        str(src),
        dst,
        data=dict(data),
        defaults=True,
        overwrite=True,
        quiet=True,
        unsafe=False,
    )
    return dst


def render_for_user(
    dst: Path, data: Mapping[str, Any], *, vcs_ref: str = "HEAD", repo: Path = REPO_ROOT
) -> Path:
    """Render from the repository itself, as ``copier copy -r REF`` would (updatable)."""
    with warnings.catch_warnings():
        # DirtyLocalWarning: rendering uncommitted template changes is the point here.
        warnings.simplefilter("ignore")
        run_copy(
            str(repo.resolve()),
            dst,
            data=dict(data),
            vcs_ref=vcs_ref,
            defaults=True,
            overwrite=False,
            quiet=True,
            unsafe=False,
        )
    return dst


def normalize_answers(project: Path) -> None:
    """Drop the location- and commit-dependent lines from the project's answers file."""
    path = project / ANSWERS_FILE
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(
        "".join(line for line in lines if not line.startswith(_VOLATILE_ANSWERS)),
        encoding="utf-8",
    )
