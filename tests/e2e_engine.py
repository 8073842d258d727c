"""An instrumented engine for the end-to-end tests, run as a real worker process.

It is the reference engine plus what a test needs to observe from outside the
process: every ``abort`` and every guard release is printed as a line
(``EVENT abort <id>`` / ``EVENT release <id>``) on stderr, which the worker's
log file captures, and a gauge of requests holding the guard is exported
through ``setup_metrics``. A prompt containing token id 7 (the word ``w7`` in
the test tokenizer) is refused with a typed ``InvalidArgument``.

    python -m tests.e2e_engine --model-path DIR --model-name NAME --delay 0.02
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Gauge

from backend_common import GenerateContext, LLMEngineOutput, PreprocessedRequest, RequestGuard
from backend_common.errors import invalid_arg
from backend_common.reference import ReferenceEngine

FORBIDDEN_TOKEN = 7


def event(kind: str, request_id: str) -> None:
    print(f"EVENT {kind} {request_id}", file=sys.stderr, flush=True)


class InstrumentedEngine(ReferenceEngine):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held = 0
        self._gauge: Gauge | None = None

    async def setup_metrics(self, registry: CollectorRegistry) -> None:
        self._gauge = Gauge(
            "e2e_engine_guarded_requests",
            "Requests currently holding the engine's request guard.",
            registry=registry,
        )
        self._gauge.set_function(lambda: self.held)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if FORBIDDEN_TOKEN in request.token_ids:
            raise invalid_arg(f"token id {FORBIDDEN_TOKEN} is not allowed by this engine")
        self.held += 1

        def release() -> None:
            self.held -= 1
            event("release", ctx.id())

        with RequestGuard(release):
            async for item in super().generate(request, ctx):
                yield item

    async def abort(self, ctx: GenerateContext) -> None:
        event("abort", ctx.id())
        await super().abort(ctx)

    async def cleanup(self) -> None:
        event("cleanup", "-")
        await super().cleanup()


if __name__ == "__main__":
    from backend_common import run

    run(InstrumentedEngine)
