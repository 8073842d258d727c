"""``TransformersEngine``: a Hugging Face causal LM served with continuous batching (template code).

The project's ``engine.py`` (user-owned) subclasses it; this module is the template's, so
``copier update`` brings fixes and features here without touching the user's file.

``start`` loads ``--model-path`` on its own thread and starts transformers'
``ContinuousBatchingManager`` (paged KV cache) on a dedicated compute thread (``hf/core.py``).
Per request (``generate``): the worker has already checked the request against the
``EngineConfig`` that ``start`` returned (``backend_common.request_policy``: prompt,
vocabulary, context, token counts, sampling ranges); here it is turned into exact decoding
rules with the model's defaults (``hf/sampling.py``: a typed ``InvalidArgument`` only for
what this engine does not do, such as beam search or logprobs), queued to the
compute thread, and its tokens come back through a ``ThreadFeed``: every item yielded
holds the tokens of one or more steps. A stop, kill, client disconnect or a dropped
stream cancels the feed, which drops the request from the batch; its KV blocks are
freed at the next step. The stream then ends with a ``cancelled`` terminal whose usage
counts the tokens actually streamed.

Finish reasons: ``eos`` (an EOS id of the model's generation config or of the request),
``stop`` (one of the request's stop token ids), ``length`` (``max_tokens``, clamped to
what fits in the context), ``cancelled``. The finishing token is part of the output and
of the usage.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from typing import Any, Self

from backend_common import (
    DisaggregationMode,
    EngineConfig,
    FinishReason,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    RequestGuard,
    WorkerConfig,
    usage,
)
from backend_common.errors import engine_shutdown, invalid_arg
from backend_common.kv_events import ComponentSnapshot, SnapshotPublisher
from backend_common.types import mark_as_probe
from prometheus_client import CollectorRegistry

from . import metrics
from .args import HfSettings, add_hf_args, check_model_path, settings_from_args
from .core import CoreInfo, EngineCore
from .sampling import RequestParams

__all__ = ["TransformersEngine"]

log = logging.getLogger(__name__)

# How often the KV usage snapshot (the router's load signal) is pushed, when it changed.
SNAPSHOT_INTERVAL_S = 0.1


class TransformersEngine(LLMEngine):
    # Where the model runs unless --device says otherwise: CUDA when available, else the CPU
    # (so a CUDA project's tests also run on a machine without a GPU).
    DEFAULT_DEVICE = "auto"

    def __init__(self, settings: HfSettings, *, model: str = "") -> None:
        self.settings = settings
        self.model = model or settings.model_path
        self.core: EngineCore | None = None
        self.info: CoreInfo | None = None
        self._snapshots: SnapshotPublisher | None = None
        self._snapshot_task: Any = None
        self._started = False
        self._closing = False

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        add_hf_args(parser, default_device=cls.DEFAULT_DEVICE)

    @classmethod
    def from_config(cls, args: argparse.Namespace, config: WorkerConfig) -> Self:
        if config.disaggregation_mode is not DisaggregationMode.AGGREGATED:
            raise invalid_arg("the transformers engine serves the aggregated role only")
        model_path = check_model_path(config.model_path)
        config.model_path = model_path
        if not config.model_name:
            config.model_name = model_path.rstrip("/").rsplit("/", 1)[-1]
        return cls(settings_from_args(args, model_path), model=config.public_name)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, worker_id: int) -> EngineConfig:
        if self._started:
            raise engine_shutdown("transformers engine already started")
        self._started = True
        self.core = EngineCore(self.settings)
        info = self.info = await self.core.start()
        return EngineConfig(
            model=self.model,
            served_model_name=self.model,
            context_length=info.context_length,
            kv_cache_block_size=info.kv_block_size,
            total_kv_blocks=info.kv_total_blocks,
            max_num_seqs=info.max_num_seqs,
            max_num_batched_tokens=info.max_batch_tokens,
            vocab_size=info.vocab_size,
        )

    async def cleanup(self) -> None:
        """Stop the compute thread and free the model, once (later calls do nothing)."""
        if self._closing:
            return
        self._closing = True
        if self._snapshot_task is not None:
            self._snapshot_task.cancel()
        if self.core is not None:
            await self.core.close()
        log.info("transformers engine: cleanup done")

    # -- requests ----------------------------------------------------------------------
    def _params(self, request: PreprocessedRequest) -> RequestParams:
        info = self.info
        assert info is not None
        return RequestParams.from_request(
            request,
            context_length=info.context_length,
            model_eos_ids=info.eos_ids,
            defaults=info.defaults,
        )

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        core = self.core
        if not self._started or core is None or self.info is None:
            raise engine_shutdown("generate called before start")
        if self._closing:
            raise engine_shutdown("transformers engine is shutting down")
        params = self._params(request)
        prompt_len = params.prompt_len
        if params.max_tokens == 0 or ctx.is_stopped():
            final = LLMEngineOutput.cancelled() if ctx.is_stopped() else LLMEngineOutput.length()
            yield final.with_usage(usage(prompt_len, 0))
            return

        feed = core.submit(ctx.id(), request.token_ids, params)
        feed.watch(ctx)
        generated = 0
        # Every exit path (finish, error, stop, a dropped stream) leaves the batch.
        with RequestGuard(feed.cancel):
            async for deltas in feed:
                tokens = [t for d in deltas for t in d.tokens]
                generated += len(tokens)
                if not deltas[-1].finished:
                    yield LLMEngineOutput(tokens)
                    continue
                finish = self._finish_reason(params, tokens)
                yield LLMEngineOutput(tokens, finish).with_usage(usage(prompt_len, generated))
                return
            if ctx.is_stopped() or feed.cancelled:
                yield LLMEngineOutput.cancelled().with_usage(usage(prompt_len, generated))
                return
            raise engine_shutdown("transformers engine stopped before the request completed")

    @staticmethod
    def _finish_reason(params: RequestParams, tokens: list[int]) -> FinishReason:
        last = tokens[-1] if tokens else None
        if last is not None and last in params.eos_ids:
            return FinishReason.EOS
        if last is not None and last in params.stop_ids:
            return FinishReason.STOP
        return FinishReason.LENGTH

    # -- worker hooks -------------------------------------------------------------------
    async def health_check_payload(self) -> dict[str, Any] | None:
        bos = self.info.bos_id if self.info is not None else None
        return mark_as_probe(
            {
                "token_ids": [bos if bos is not None else 0],
                "stop_conditions": {"max_tokens": 1, "ignore_eos": True},
                "sampling_options": {"temperature": 0.0},
            }
        )

    async def setup_metrics(self, registry: CollectorRegistry) -> None:
        metrics.register(registry, lambda: self.core)

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0]

    def attach_snapshot_publisher(self, publisher: SnapshotPublisher) -> None:
        import asyncio

        self._snapshots = publisher
        self._snapshot_task = asyncio.get_running_loop().create_task(self._push_snapshots())

    async def _push_snapshots(self) -> None:
        import asyncio

        last: tuple[int, int] | None = None
        while not self._closing:
            core, publisher = self.core, self._snapshots
            if core is not None and publisher is not None:
                stats = core.stats
                key = (stats.kv_used_blocks, stats.kv_total_blocks)
                if key != last:
                    last = key
                    publisher.publish(
                        0,
                        ComponentSnapshot(
                            kv_used_blocks=stats.kv_used_blocks,
                            kv_total_blocks=stats.kv_total_blocks,
                            gpu_cache_usage=stats.kv_usage,
                            dp_rank=0,
                        ),
                    )
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
