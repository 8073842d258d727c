"""Resolve Dynamo 1.6.1's module names to this package, so unmodified 1.6.1 engines import.

``install(source_dirs)`` puts one finder first on ``sys.meta_path``. From then on:

* ``dynamo.common.backend`` is a module with this package's public names, and its
  submodules ``engine``, ``worker``, ``publisher``, ``telemetry``, ``disagg``,
  ``health_check``, ``logprobs``, ``multimodal``, ``dp_rank`` (and ``run``: ``launch``) are
  this package's modules (the same module objects: an engine's ``isinstance`` checks and the
  adapter's agree);
* ``dynamo._core`` and ``dynamo._core.backend`` are ``core``, ``dynamo.llm`` is ``llm``,
  ``dynamo.common.constants`` is ``constants``, ``dynamo.common.utils.token_ids`` is
  ``token_ids``;
* ``dynamo``, ``dynamo.common`` and ``dynamo.common.utils`` are empty packages;
* any other ``dynamo.common.backend.<name>`` is loaded from ``<dir>/<name>.py`` of the first
  of ``source_dirs`` that has it (the engine's own modules, e.g. a 1.6.1 wheel's
  ``sample_engine.py``), with its relative imports resolving as above.

Nothing else named ``dynamo`` resolves while the finder is installed, and ``install`` refuses
to run when a ``dynamo`` module is already imported (a real Dynamo in the process).
``uninstall()`` removes the finder and the modules it aliased. Called by ``launch`` and by
tests; never by the worker.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["ALIASES", "PACKAGES", "install", "uninstall"]

_PKG = __name__.rpartition(".")[0]
# 1.6.1 submodule -> ours, where the names differ (``run`` is the entry-point module here).
_MODULE_OF = {"run": "launch"}

ALIASES: dict[str, str] = {
    **{
        f"dynamo.common.backend.{name}": f"{_PKG}.{_MODULE_OF.get(name, name)}"
        for name in (
            "engine",
            "worker",
            "run",
            "publisher",
            "telemetry",
            "disagg",
            "health_check",
            "logprobs",
            "multimodal",
            "dp_rank",
        )
    },
    "dynamo._core": f"{_PKG}.core",
    "dynamo._core.backend": f"{_PKG}.core",
    "dynamo.llm": f"{_PKG}.llm",
    "dynamo.common.constants": f"{_PKG}.constants",
    "dynamo.common.utils.token_ids": f"{_PKG}.token_ids",
}
"""1.6.1 module name -> the module of this package that stands for it."""

PACKAGES = ("dynamo", "dynamo.common", "dynamo.common.utils")
"""Parent packages with no content of their own."""


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system stamped the alias's spec on the shared module; give it back its own.
        module.__spec__ = importlib.util.find_spec(self.target)


class _FacadeLoader(importlib.abc.Loader):
    """``dynamo.common.backend``: a module of its own holding this package's public names.

    Not the package object itself: importing ``dynamo.common.backend.run`` binds ``run`` on
    its parent, which must not replace ``dynamo_compat.run`` (the function).
    """

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        package = importlib.import_module(_PKG)
        for name in package.__all__:
            if name != "run":
                setattr(module, name, getattr(package, name))
        module.__all__ = [n for n in package.__all__ if n != "run"]  # type: ignore[attr-defined]
        module.__path__ = []


class _PackageLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


class _DynamoFinder(importlib.abc.MetaPathFinder):
    def __init__(self, source_dirs: Sequence[Path]) -> None:
        self.source_dirs = list(source_dirs)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "dynamo.common.backend":
            return importlib.machinery.ModuleSpec(fullname, _FacadeLoader(), is_package=True)
        if fullname in ALIASES:
            # dynamo._core is a package in 1.6.1 (dynamo._core.backend); the alias gets a __path__.
            is_pkg = fullname == "dynamo._core"
            return importlib.machinery.ModuleSpec(
                fullname, _AliasLoader(ALIASES[fullname]), is_package=is_pkg
            )
        if fullname in PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, _PackageLoader(), is_package=True)
        prefix = "dynamo.common.backend."
        if fullname.startswith(prefix) and "." not in fullname[len(prefix) :]:
            for directory in self.source_dirs:
                source = directory / f"{fullname[len(prefix) :]}.py"
                if source.is_file():
                    return importlib.util.spec_from_file_location(fullname, source)
        if fullname == "dynamo" or fullname.startswith("dynamo."):
            return None  # not provided: ModuleNotFoundError, never a real Dynamo module
        return None


_installed: list[_DynamoFinder] = []


def install(source_dirs: Iterable[str | Path] = ()) -> None:
    """Install the finder (idempotent; later calls add ``source_dirs``)."""
    dirs = [Path(d) for d in source_dirs]
    if _installed:
        _installed[0].source_dirs.extend(d for d in dirs if d not in _installed[0].source_dirs)
        return
    if "dynamo" in sys.modules:
        raise RuntimeError(
            "a 'dynamo' module is already imported; the compatibility aliases would shadow it"
        )
    finder = _DynamoFinder(dirs)
    sys.meta_path.insert(0, finder)
    _installed.append(finder)


def uninstall() -> None:
    """Remove the finder and every ``dynamo`` module imported through it."""
    for finder in _installed:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
    _installed.clear()
    for name in [n for n in sys.modules if n == "dynamo" or n.startswith("dynamo.")]:
        del sys.modules[name]
