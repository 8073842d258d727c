"""``VllmCpuBackendEngine``: the engine behind this worker. This file is yours.

``copier update`` never overwrites it. The vLLM engine itself, ``VllmEngine`` (vLLM's
``AsyncLLM`` from vLLM's own flags, exact request mapping, cancellation, engine-core death,
KV events and metrics), lives in ``vllm_engine/``: template code that ``copier update``
keeps current. Customize here by overriding its hooks (marked ``YOUR ENGINE:``), or any
``LLMEngine`` hook (call ``super()`` to keep vLLM's own); ``make test`` checks the
contract (``tests/test_conformance.py``) and the served outputs (``tests/test_vllm.py``).
"""

from __future__ import annotations

from backend_common import LLMEngineOutput, PreprocessedRequest, WorkerConfig
from vllm import SamplingParams
from vllm.outputs import CompletionOutput

from . import args as cli
from .vllm_engine.engine import VllmEngine

__all__ = ["VllmCpuBackendEngine"]


class VllmCpuBackendEngine(VllmEngine):
    @classmethod
    def from_args(
        cls,
        argv: list[str] | None = None,
    ) -> tuple[VllmCpuBackendEngine, WorkerConfig]:
        return cli.from_args(argv, cls)

    # YOUR ENGINE: adjust vLLM's sampling parameters per request (scheduling hints,
    # request shaping, ...). Called once per request, before vLLM sees it.
    def adjust_sampling_params(
        self, params: SamplingParams, request: PreprocessedRequest
    ) -> SamplingParams:
        return params

    # YOUR ENGINE: post-process each stream item (one per engine step) before it is sent.
    def postprocess_output(
        self, output: LLMEngineOutput, completion: CompletionOutput, request: PreprocessedRequest
    ) -> LLMEngineOutput:
        return output
