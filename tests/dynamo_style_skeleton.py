"""The template's skeleton engine, rewritten in Dynamo 1.6.1's Python backend style.

Same behaviour as the generated ``skeleton`` engine (token ids 1, 2, 3, ... with an optional
per-token ``--delay``, ``--max-tokens`` for requests without one, a cancelled terminal with
usage when the request is stopped, typed errors for an empty or too-long prompt), written as
a 1.6.1 engine: ``from_args`` is async and returns ``(engine, WorkerConfig)``, ``start``
returns an ``EngineConfig`` with an ``LlmRegistration``, ``generate`` takes and yields dicts.
Its only tie to this runtime is the import of ``backend_common.dynamo_compat`` where a 1.6.1
engine imports ``dynamo.common.backend``. ``abort`` and ``cleanup`` write ``EVENT`` lines on
stderr for the tests.

    python -m tests.dynamo_style_skeleton --model-name DIR --served-model-name NAME [--delay S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncGenerator

from backend_common.dynamo_compat import (
    Context,
    EngineConfig,
    GenerateChunk,
    GenerateRequest,
    LLMEngine,
    LlmRegistration,
    WorkerConfig,
    run,
)

DEFAULT_MAX_TOKENS = 16
CONTEXT_LENGTH = 2048
KV_BLOCK_SIZE = 16
TOKEN_CYCLE = 1000


def event(kind: str, detail: str) -> None:
    print(f"EVENT {kind} {detail}", file=sys.stderr, flush=True)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class DynamoStyleSkeleton(LLMEngine):
    def __init__(
        self, model: str = "skeleton", *, delay: float = 0.0, max_tokens: int = DEFAULT_MAX_TOKENS
    ) -> None:
        self.model = model
        self.delay = delay
        self.max_tokens = max_tokens
        self.started = False

    @classmethod
    async def from_args(
        cls, argv: list[str] | None = None
    ) -> tuple[DynamoStyleSkeleton, WorkerConfig]:
        parser = argparse.ArgumentParser(description="skeleton engine, Dynamo 1.6.1 style")
        parser.add_argument("--model-name", default="skeleton")
        parser.add_argument("--served-model-name", default=None)
        parser.add_argument("--namespace", default="dynamo")
        parser.add_argument("--component", default="backend")
        parser.add_argument("--discovery-backend", default="etcd")
        parser.add_argument("--request-plane", default="tcp")
        parser.add_argument("--delay", type=float, default=0.0)
        parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
        args = parser.parse_args(argv)
        if args.delay < 0 or args.max_tokens < 1:
            raise ValueError("--delay must be >= 0 and --max-tokens >= 1")
        served = args.served_model_name or args.model_name
        engine = cls(served, delay=args.delay, max_tokens=args.max_tokens)
        config = WorkerConfig(
            namespace=args.namespace,
            component=args.component,
            model_name=args.model_name,
            served_model_name=served,
            discovery_backend=args.discovery_backend,
            request_plane=args.request_plane,
        )
        return engine, config

    async def start(self, worker_id: int) -> EngineConfig:
        self.started = True
        return EngineConfig(
            model=self.model,
            served_model_name=self.model,
            llm=LlmRegistration(
                context_length=CONTEXT_LENGTH,
                kv_cache_block_size=KV_BLOCK_SIZE,
                total_kv_blocks=1024,
                max_num_seqs=256,
                max_num_batched_tokens=CONTEXT_LENGTH,
            ),
        )

    async def generate(
        self, request: GenerateRequest, context: Context
    ) -> AsyncGenerator[GenerateChunk, None]:
        if not self.started:
            raise RuntimeError("generate() before start()")
        prompt = len(request.get("token_ids", []))
        if prompt == 0:
            raise ValueError("empty prompt")
        if prompt >= CONTEXT_LENGTH:
            raise ValueError(f"prompt of {prompt} tokens fills the context ({CONTEXT_LENGTH})")
        wanted = (request.get("stop_conditions") or {}).get("max_tokens") or self.max_tokens
        limit = min(wanted, CONTEXT_LENGTH - prompt)
        for i in range(limit):
            if self.delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(context.async_killed_or_stopped(), self.delay)
            if context.is_stopped():
                yield {
                    "token_ids": [],
                    "index": 0,
                    "finish_reason": "cancelled",
                    "completion_usage": _usage(prompt, i),
                }
                return
            out: GenerateChunk = {"token_ids": [1 + i % TOKEN_CYCLE], "index": 0}
            if i + 1 == limit:
                out["finish_reason"] = "length"
                out["completion_usage"] = _usage(prompt, limit)
            yield out

    async def abort(self, context: Context) -> None:
        event("abort", context.id())

    async def cleanup(self) -> None:
        if self.started:
            event("cleanup", self.model)
        self.started = False


if __name__ == "__main__":
    run(DynamoStyleSkeleton)
