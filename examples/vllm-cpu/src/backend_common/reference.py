"""The reference engine: deterministic tokens, optional per-token delay.

It emits ids ``1, 2, 3, ...`` (each a plain word in the test tokenizer) up to
``max_tokens`` (default ``--max-tokens``, 16), the last one on the ``length``
terminal with usage. It is the engine the runtime's own tests, the benchmark
and the template's skeleton are measured with, so it does nothing the
contract does not ask for. In prefill mode it caps output at one token and
returns a handoff in ``disaggregated_params``; in decode mode it requires one.

Per token it awaits ``asyncio.sleep(delay)`` (also at ``--delay 0``): one
suspension per token, as Dynamo's sample engine does, so the worker sees one
item per loop turn like it would from a real engine.

``--publish-kv-events`` (off by default) makes it publish what Dynamo's sample
engine publishes, so the two can be compared with KV publishing on: per request
one ``stored`` event of ``max(1, prompt_len // 16)`` synthetic blocks when it
starts and the matching ``removed`` event when it ends, and a cache-usage
snapshot (the router's load signal) every ``SNAPSHOT_INTERVAL_S``.

Run it as a worker: ``python -m backend_common.reference --model-path DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator

from .args import add_common_args, worker_config_from_args
from .config import DisaggregationMode, EngineConfig, WorkerConfig
from .context import GenerateContext
from .disagg import enforce_prefill_max_tokens, require_prefill_result
from .engine import LLMEngine
from .guard import RequestGuard
from .kv_events import ComponentSnapshot, KvEventPublisher, PushSource, SnapshotPublisher, ZmqSource
from .types import LLMEngineOutput, PreprocessedRequest, chunk, usage

__all__ = ["ReferenceEngine"]

BLOCK_SIZE = 16
TOTAL_KV_BLOCKS = 1000
SNAPSHOT_INTERVAL_S = 0.1


class ReferenceEngine(LLMEngine):
    def __init__(
        self,
        model: str = "reference-model",
        *,
        delay: float = 0.0,
        max_tokens: int = 16,
        context_length: int = 2048,
        mode: DisaggregationMode = DisaggregationMode.AGGREGATED,
        publish_kv_events: bool = False,
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
        self.publish_kv_events = publish_kv_events
        self._kv_publisher: KvEventPublisher | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._block_hashes = itertools.count(1)
        self.kv_used_blocks = 0

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> tuple[ReferenceEngine, WorkerConfig]:
        parser = argparse.ArgumentParser(description="backend_common reference engine")
        add_common_args(parser)
        parser.add_argument("--delay", type=float, default=0.0, help="seconds per token")
        parser.add_argument("--max-tokens", type=int, default=16, help="default max_tokens")
        parser.add_argument(
            "--publish-kv-events",
            action="store_true",
            help="publish synthetic KV stored/removed events and load snapshots per request",
        )
        args = parser.parse_args(argv)
        config = worker_config_from_args(args)
        engine = cls(
            config.public_name or "reference-model",
            delay=args.delay,
            max_tokens=args.max_tokens,
            mode=config.disaggregation_mode,
            publish_kv_events=args.publish_kv_events,
        )
        return engine, config

    async def start(self, worker_id: int) -> EngineConfig:
        self._started = True
        return EngineConfig(
            model=self.model,
            context_length=self.context_length,
            kv_cache_block_size=BLOCK_SIZE,
            total_kv_blocks=TOTAL_KV_BLOCKS,
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
        delay = self.delay
        self.active += 1
        blocks = self._store_blocks(prompt) if self._kv_publisher is not None else None
        with RequestGuard(lambda: self._release(blocks)):
            for i in range(1, limit + 1):
                if ctx.is_stopped():
                    yield LLMEngineOutput.cancelled().with_usage(usage(prompt, i - 1))
                    return
                await asyncio.sleep(delay)
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

    def _release(self, blocks: list[int] | None) -> None:
        self.active -= 1
        if blocks is not None and self._kv_publisher is not None:
            self._kv_publisher.publish_removed(blocks)
            self.kv_used_blocks = max(0, self.kv_used_blocks - len(blocks))

    # -- KV publishing (--publish-kv-events), shaped like Dynamo's sample engine ----------
    def _store_blocks(self, prompt_len: int) -> list[int]:
        count = max(1, prompt_len // BLOCK_SIZE)
        hashes = [next(self._block_hashes) for _ in range(count)]
        assert self._kv_publisher is not None
        self._kv_publisher.publish_stored(
            list(range(count * BLOCK_SIZE)), [BLOCK_SIZE] * count, hashes
        )
        self.kv_used_blocks += count
        return hashes

    async def kv_event_sources(self) -> list[PushSource | ZmqSource]:
        return [PushSource(self._on_kv_publisher, dp_rank=0)] if self.publish_kv_events else []

    def _on_kv_publisher(self, publisher: KvEventPublisher) -> None:
        self._kv_publisher = publisher

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0] if self.publish_kv_events else []

    def attach_snapshot_publisher(self, publisher: SnapshotPublisher) -> None:
        self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshots(publisher))

    async def _snapshots(self, publisher: SnapshotPublisher) -> None:
        while True:
            used = self.kv_used_blocks
            publisher.publish(
                0,
                ComponentSnapshot(
                    kv_used_blocks=used,
                    kv_total_blocks=TOTAL_KV_BLOCKS,
                    gpu_cache_usage=used / TOTAL_KV_BLOCKS,
                    dp_rank=0,
                    kv_cache_hit_rate=None,
                ),
            )
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)

    async def abort(self, ctx: GenerateContext) -> None:
        self.aborted.append(ctx.id())

    async def cleanup(self) -> None:
        self.cleanups += 1
        self._started = False
        if self._snapshot_task is not None:
            self._snapshot_task.cancel()
            self._snapshot_task = None


def main() -> None:
    from .runtime.runner import run

    run(ReferenceEngine)


if __name__ == "__main__":
    main()
