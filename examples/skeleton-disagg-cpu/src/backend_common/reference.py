"""The reference engine: deterministic tokens, optional per-token delay.

It emits ids ``1, 2, 3, ...`` (each a plain word in the test tokenizer) up to
``max_tokens`` (default ``--max-tokens``, 16), the last one on the ``length``
terminal with usage. It is the engine the runtime's own tests, the benchmark
and the template's skeleton are measured with, so it does nothing the
contract does not ask for. In prefill mode it caps output at one token and
returns a handoff in ``disaggregated_params``; in decode mode it requires one.

Run it as a worker: ``python -m backend_common.reference --model-path DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator

from .args import add_common_args, worker_config_from_args
from .config import DisaggregationMode, EngineConfig, WorkerConfig
from .context import GenerateContext
from .disagg import enforce_prefill_max_tokens, require_prefill_result
from .engine import LLMEngine
from .guard import RequestGuard
from .types import LLMEngineOutput, PreprocessedRequest, chunk, usage

__all__ = ["ReferenceEngine"]


class ReferenceEngine(LLMEngine):
    def __init__(
        self,
        model: str = "reference-model",
        *,
        delay: float = 0.0,
        max_tokens: int = 16,
        context_length: int = 2048,
        mode: DisaggregationMode = DisaggregationMode.AGGREGATED,
    ) -> None:
        self.model = model
        self.delay = delay
        self.max_tokens = max_tokens
        self.context_length = context_length
        self.mode = mode
        self.active = 0
        self.aborted: list[str] = []
        self.cleanups = 0
        self._started = False

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> tuple[ReferenceEngine, WorkerConfig]:
        parser = argparse.ArgumentParser(description="backend_common reference engine")
        add_common_args(parser)
        parser.add_argument("--delay", type=float, default=0.0, help="seconds per token")
        parser.add_argument("--max-tokens", type=int, default=16, help="default max_tokens")
        args = parser.parse_args(argv)
        config = worker_config_from_args(args)
        engine = cls(
            config.public_name or "reference-model",
            delay=args.delay,
            max_tokens=args.max_tokens,
            mode=config.disaggregation_mode,
        )
        return engine, config

    async def start(self, worker_id: int) -> EngineConfig:
        self._started = True
        return EngineConfig(
            model=self.model,
            context_length=self.context_length,
            kv_cache_block_size=16,
            total_kv_blocks=1000,
            max_num_seqs=256,
            max_num_batched_tokens=self.context_length,
        )

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if self.mode is DisaggregationMode.PREFILL:
            enforce_prefill_max_tokens(request)
        elif self.mode is DisaggregationMode.DECODE:
            require_prefill_result(request, self.mode)
        limit = request.stop_conditions.max_tokens or self.max_tokens
        prompt = len(request.token_ids)
        self.active += 1
        with RequestGuard(self._release):
            for i in range(1, limit + 1):
                if ctx.is_stopped():
                    yield LLMEngineOutput.cancelled().with_usage(usage(prompt, i - 1))
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                if i < limit:
                    yield chunk.token(i)
                    continue
                final = LLMEngineOutput.length().with_tokens([i]).with_usage(usage(prompt, i))
                if self.mode is DisaggregationMode.PREFILL:
                    final.disaggregated_params = {
                        "reference_handle": uuid.uuid4().hex,
                        "completed_tokens": [i],
                    }
                yield final

    def _release(self) -> None:
        self.active -= 1

    async def abort(self, ctx: GenerateContext) -> None:
        self.aborted.append(ctx.id())

    async def cleanup(self) -> None:
        self.cleanups += 1
        self._started = False


def main() -> None:
    from .runtime.runner import run

    run(ReferenceEngine)


if __name__ == "__main__":
    main()
