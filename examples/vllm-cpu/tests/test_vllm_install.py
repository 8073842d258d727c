"""The project's venv serves text models with vLLM: no CUDA-only torch companions in it.

pip brings PyPI's torchvision, torchaudio and torchcodec beside vLLM; those builds link
against the CUDA torch, and with any of them present ``import transformers`` fails for
every model (README, "Commands"). ``make install`` removes them; this test fails if they
come back (a dependency change, a manual ``pip install``).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")


@pytest.mark.parametrize("name", CUDA_ONLY)
def test_cuda_only_torch_companions_are_not_installed(name: str) -> None:
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution(name)


def test_vllm_and_transformers_import_and_load_a_llama_config() -> None:
    # A fresh interpreter: the imports of this test session must not hide a broken one.
    code = (
        "import vllm, transformers; from transformers import LlamaConfig; "
        "print(vllm.__version__, LlamaConfig().model_type)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "llama"
    assert out.stdout.split()[0].startswith("0.31.0")
