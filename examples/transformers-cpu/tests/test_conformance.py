"""The engine meets the ``LLMEngine`` contract: ``backend_common.testing.run_conformance``.

The kit drives the engine directly (no worker, no network): start, kv_event_sources and
setup_metrics twice each, one request, eight concurrent ones, a cancelled one, cleanup
twice, and cleanup on a never-started engine. It builds the engine through ``from_args``,
exactly as the worker does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from backend_common.devstack.tinyllm import write_tiny_causal_lm
from backend_common.testing import run_conformance

from transformers_cpu.engine import TransformersCpuEngine


def make_engine(*argv: str) -> TransformersCpuEngine:
    engine, _config = TransformersCpuEngine.from_args(["--model-name", "conformance", *argv])
    return engine


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A tiny random-weight Llama built from its config: real forward passes, no download.
    return write_tiny_causal_lm(tmp_path_factory.mktemp("model"))


async def test_engine_conforms(model_path: Path) -> None:
    argv = ("--model-path", str(model_path), "--device", "cpu", "--cpu-threads", "1")
    await run_conformance(lambda: make_engine(*argv))
