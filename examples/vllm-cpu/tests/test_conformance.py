"""The engine meets the ``LLMEngine`` contract: ``backend_common.testing.run_conformance``.

The kit drives the engine directly (no worker, no network): start, kv_event_sources and
setup_metrics twice each, one request, eight concurrent ones, a cancelled one, cleanup
twice, and cleanup on a never-started engine. It builds the engine through ``from_args``,
exactly as the worker does.
"""

from __future__ import annotations

from backend_common.testing import run_conformance

from vllm_cpu.engine import VllmCpuEngine


def make_engine(*argv: str) -> VllmCpuEngine:
    engine, _config = VllmCpuEngine.from_args(["--model-name", "conformance", *argv])
    return engine


async def test_engine_conforms() -> None:
    await run_conformance(make_engine)
