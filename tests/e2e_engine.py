"""An instrumented engine for the end-to-end tests, run as a real worker process.

It is the reference engine plus what a test needs to observe from outside the
process: every ``abort``, every natural terminal item and every guard release is printed as a
line (``EVENT abort <id>`` / ``EVENT finish <id>`` / ``EVENT release <id>``) on stderr,
which the worker's log file captures, and a gauge of requests holding the guard is exported
through ``setup_metrics``, with the worker's asyncio task count and RSS. A prompt
containing token id 7 (the word ``w7`` in the test tokenizer) is refused with a
typed ``InvalidArgument``. Fault injection for the reliability tests, by prompt
token: ``w901`` raises after 3 tokens, ``w902`` hangs after 2 tokens (ignoring
stop/kill), ``w903`` yields one item after its terminal. The vocabulary size
is read from the model directory's ``config.json``.

    python -m tests.e2e_engine --model-path DIR --model-name NAME --delay 0.02
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from backend_common import (
    EngineConfig,
    GenerateContext,
    LLMEngineOutput,
    PreprocessedRequest,
    RequestGuard,
)
from backend_common.errors import invalid_arg
from backend_common.reference import ReferenceEngine

FORBIDDEN_TOKEN = 7
RAISE_TOKEN = 901
HANG_TOKEN = 902
AFTER_TERMINAL_TOKEN = 903


def event(kind: str, request_id: str) -> None:
    print(f"EVENT {kind} {request_id}", file=sys.stderr, flush=True)


class InstrumentedEngine(ReferenceEngine):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held = 0
        self._gauge: Gauge | None = None
        self.vocab_size: int | None = None

    @classmethod
    def from_args(cls, argv=None):
        engine, config = super().from_args(argv)
        if config.model_path:
            card = json.loads((Path(config.model_path) / "config.json").read_text())
            engine.vocab_size = card.get("vocab_size")
        return engine, config

    async def start(self, worker_id: int) -> EngineConfig:
        config = await super().start(worker_id)
        config.vocab_size = self.vocab_size
        return config

    async def setup_metrics(self, registry: CollectorRegistry) -> None:
        self._gauge = Gauge(
            "e2e_engine_guarded_requests",
            "Requests currently holding the engine's request guard.",
            registry=registry,
        )
        self._gauge.set_function(lambda: self.held)
        loop = asyncio.get_running_loop()
        Gauge(
            "e2e_engine_asyncio_tasks", "asyncio tasks alive in the worker.", registry=registry
        ).set_function(lambda: len(asyncio.all_tasks(loop)))
        page = os.sysconf("SC_PAGE_SIZE")
        Gauge(
            "e2e_engine_rss_bytes", "Resident set size of the worker.", registry=registry
        ).set_function(lambda: int(Path("/proc/self/statm").read_text().split()[1]) * page)

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
            fault = next(
                (
                    t
                    for t in (RAISE_TOKEN, HANG_TOKEN, AFTER_TERMINAL_TOKEN)
                    if t in request.token_ids
                ),
                None,
            )
            count = 0
            async for item in super().generate(request, ctx):
                if fault == RAISE_TOKEN and count == 3:
                    raise RuntimeError("injected engine fault")
                if fault == HANG_TOKEN and count == 2:
                    event("hang", ctx.id())
                    await asyncio.Event().wait()  # never set: ignores stop and kill
                if item.finish_reason not in (None, "cancelled"):
                    event("finish", ctx.id())  # finished on its own (not stopped)
                yield item
                count += 1
                if fault == AFTER_TERMINAL_TOKEN and item.finish_reason is not None:
                    yield LLMEngineOutput([1])

    async def abort(self, ctx: GenerateContext) -> None:
        event("abort", ctx.id())
        await super().abort(ctx)

    async def cleanup(self) -> None:
        event("cleanup", "-")
        await super().cleanup()


if __name__ == "__main__":
    from backend_common import run

    run(InstrumentedEngine)
