"""The engine meets the ``LLMEngine`` contract: ``backend_common.testing.run_conformance``.

The kit drives the engine directly (no worker, no network): start, kv_event_sources and
setup_metrics twice each, one request, eight concurrent ones, a cancelled one, cleanup
twice, and cleanup on a never-started engine. It builds the engine through ``from_args``,
exactly as the worker does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from backend_common.devstack.tinyllm import write_tiny_llama
from backend_common.testing import run_conformance

from vllm_cpu_backend.engine import VllmCpuBackendEngine


def make_engine(*argv: str) -> VllmCpuBackendEngine:
    engine, _config = VllmCpuBackendEngine.from_args(["--model-name", "conformance", *argv])
    return engine


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A tiny random-weight Llama that vLLM's CPU attention accepts (head size 64).
    return write_tiny_llama(tmp_path_factory.mktemp("model"))


async def test_engine_conforms(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    # An AsyncLLM start (engine core spawn, profiling) passes the kit's 60 s per step on a
    # loaded 2-core machine; every other step keeps its bound.
    monkeypatch.setattr("backend_common.testing.STEP_TIMEOUT_S", 300.0)
    argv = ("--model", str(model_path), "--enforce-eager", "--dtype", "float32")
    await run_conformance(lambda: make_engine(*argv, "--max-model-len", "512"))
