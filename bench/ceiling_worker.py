"""The cheapest worker behind the frontend: what the frontend alone can carry on this machine.

``python -m bench.ceiling_worker --model-path DIR ...`` (the reference engine's flags) serves
the reference engine's tokens (``1..max_tokens``, one token per item, the last on the
``length`` terminal with usage) without suspending between tokens. The runtime's adapter then
relays up to 16 items per loop turn in one socket write (``adapter.YIELD_EVERY``), so the
worker spends far less CPU per token than any real engine would, while the frontend still
receives, detokenizes and streams one item, and one SSE event, per token: the same work per
token it does behind every other target.

The benchmark serves it as target ``f``. Its frontend CPU per token gives the frontend's own
ceiling: ``1000 / frontend_cpu_s_per_1k_tokens`` output tokens per second is the rate at which
the frontend process alone keeps one core busy, the most any worker behind it can reach here
(``bench.report.frontend_ceiling``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from backend_common.context import GenerateContext
from backend_common.reference import ReferenceEngine
from backend_common.types import LLMEngineOutput, PreprocessedRequest, chunk, usage

__all__ = ["CeilingEngine"]


class CeilingEngine(ReferenceEngine):
    """The reference engine's output with no suspension per token (aggregated mode only)."""

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        limit = request.stop_conditions.max_tokens or self.max_tokens
        prompt = len(request.token_ids)
        for i in range(1, limit):
            if ctx.is_stopped():
                yield LLMEngineOutput.cancelled().with_usage(usage(prompt, i - 1))
                return
            yield chunk.token(i)
        yield LLMEngineOutput.length().with_tokens([limit]).with_usage(usage(prompt, limit))


def main() -> None:
    from backend_common.runtime.runner import run

    run(CeilingEngine)


if __name__ == "__main__":
    main()
