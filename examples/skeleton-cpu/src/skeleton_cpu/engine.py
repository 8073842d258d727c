"""``SkeletonCpuEngine``: the engine behind this worker. This file is yours.

``copier update`` never overwrites it. Replace the places marked ``# YOUR ENGINE:`` with
calls into your inference engine and keep the structure; ``make test`` checks the
contract (``tests/test_conformance.py``) after every change. Who calls what:

* ``add_args`` / ``from_config``: once, at startup (via ``from_args``). The engine's own
  flags, and building the engine from them. Nothing heavy here: no model loading.
* ``start``: once. Load the model; return what the frontend must know (``EngineConfig``).
* ``generate``: once per request, many concurrently, with a request the worker has already
  checked against what ``start`` returned (``backend_common.request_policy``: a prompt that
  fits the context, token ids in the vocabulary, sampling values in range). Yield
  ``chunk.token(id)`` items, then exactly one terminal item (finish reason set, usage
  attached). Poll
  ``ctx.is_stopped()`` between yields and end with a cancelled terminal when it is set.
  Per-request resources are freed by the guard, which runs on every exit path.
* ``cleanup``: once at shutdown; idempotent, and safe on a never-started engine.

As generated it streams deterministic tokens (ids 1, 2, 3, ...) with no delay
(``--delay`` adds one per token), so the whole stack works before your engine exists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from backend_common import (
    ActiveRequests,
    EngineConfig,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    WorkerConfig,
    chunk,
    usage,
)

from . import args as cli
from . import errors

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
CONTEXT_LENGTH = 2048
KV_BLOCK_SIZE = 16
TOKEN_CYCLE = 1000
"""Token ids cycle through 1..TOKEN_CYCLE: ordinary words in any real vocabulary."""


class SkeletonCpuEngine(LLMEngine):
    def __init__(
        self,
        model: str = "skeleton-cpu",
        *,
        delay: float = 0.0,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        context_length: int = CONTEXT_LENGTH,
    ) -> None:
        self.model = model
        self.delay = delay
        self.max_tokens = max_tokens
        self.context_length = context_length
        self.active = ActiveRequests()
        self.started = False

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("engine")
        # YOUR ENGINE: your engine's own flags.
        group.add_argument(
            "--delay", type=float, default=0.0, help="seconds to wait before each token"
        )
        group.add_argument(
            "--max-tokens",
            type=int,
            default=DEFAULT_MAX_TOKENS,
            help="output length for requests that set no max_tokens",
        )

    @classmethod
    def from_config(cls, args: argparse.Namespace, config: WorkerConfig) -> SkeletonCpuEngine:
        if args.delay < 0:
            raise errors.invalid_config(f"--delay must be >= 0, got {args.delay}")
        if args.max_tokens < 1:
            raise errors.invalid_config(f"--max-tokens must be >= 1, got {args.max_tokens}")
        return cls(
            config.public_name or "skeleton-cpu",
            delay=args.delay,
            max_tokens=args.max_tokens,
        )

    @classmethod
    def from_args(
        cls,
        argv: list[str] | None = None,
    ) -> tuple[SkeletonCpuEngine, WorkerConfig]:
        return cli.from_args(argv, cls)

    async def start(self, worker_id: int) -> EngineConfig:
        # YOUR ENGINE: load the weights, allocate the KV cache, start your scheduler.
        self.started = True
        log.info("%s started (worker %x)", self.model, worker_id)
        return EngineConfig(
            model=self.model,
            context_length=self.context_length,
            kv_cache_block_size=KV_BLOCK_SIZE,
            total_kv_blocks=1024,
            max_num_seqs=256,
            max_num_batched_tokens=self.context_length,
        )

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if not self.started:
            raise errors.not_started()
        # The worker refused an empty prompt or one that leaves no room in the context.
        prompt = len(request.token_ids)
        limit = min(
            request.stop_conditions.max_tokens or self.max_tokens, self.context_length - prompt
        )

        # YOUR ENGINE: submit the request to your engine here, and pass what frees its
        # resources as track(ctx, release=...): it runs on finish, error, cancel and on an
        # early close by the consumer.
        with self.active.track(ctx):
            for i in range(limit):
                if self.delay:
                    # Wakes early when the request is cancelled.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ctx.stopped(), self.delay)
                if ctx.is_stopped():
                    yield LLMEngineOutput.cancelled().with_usage(usage(prompt, i))
                    return
                # YOUR ENGINE: the next token of this request.
                token = 1 + i % TOKEN_CYCLE
                if i + 1 < limit:
                    yield chunk.token(token)
                    continue
                final = LLMEngineOutput.length().with_tokens([token])
                final = final.with_usage(usage(prompt, limit))
                yield final

    async def abort(self, ctx: GenerateContext) -> None:
        # YOUR ENGINE: only out-of-band notices (e.g. a remote scheduler); per-request
        # cleanup belongs in the guard in generate(), which also covers silent drops.
        log.debug("request %s aborted", ctx.id())

    async def cleanup(self) -> None:
        # YOUR ENGINE: stop your scheduler, free the KV cache, unload the model.
        # Idempotent, and called on a never-started engine too.
        stopped = self.active.stop_all()
        if self.started:
            log.info("%s cleaned up (%d streams stopped)", self.model, stopped)
        self.started = False
