"""Inert ``torchvision`` for Dynamo's own vLLM worker, target (f) of the bench, and nothing else.

``python -m dynamo.vllm`` (ai-dynamo 1.6.1) imports ``torchvision.transforms.v2`` at import
time (its multimodal helpers), and transformers' image utilities import ``torchvision.io``
and read ``InterpolationMode.NEAREST_EXACT`` once torchvision looks installed. The PyPI
torchvision is linked against the CUDA torch and cannot load beside vLLM's CPU torch, so the
bench's anchor venv has none (``bench/anchor_install.py``). Python imports this file at
start-up when its directory is on ``PYTHONPATH`` (the ``site`` module's ``sitecustomize``
hook); it installs a meta-path finder that answers every ``torchvision`` / ``torchvision.*``
import with an inert module: any public attribute is a placeholder class whose own public
attributes are strings. Text models never call into it. The bench puts this directory on
``PYTHONPATH`` for target (f) only; our own workers never see it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

_ROOT = "torchvision"


class _PlaceholderMeta(type):
    def __getattr__(cls, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__qualname__}.{name}"


class _InertModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = _PlaceholderMeta(name, (), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _InertLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _InertModule(spec.name)
        module.__path__ = []  # a package, so that any submodule import reaches the finder
        module.__dict__["__version__"] = "0.0.0+inert"
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _InertTorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _ROOT and not fullname.startswith(_ROOT + "."):
            return None
        return importlib.machinery.ModuleSpec(fullname, _InertLoader(), is_package=True)


if not any(isinstance(f, _InertTorchvisionFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _InertTorchvisionFinder())
