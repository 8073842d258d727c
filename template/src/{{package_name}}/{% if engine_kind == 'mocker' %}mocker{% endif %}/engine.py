"""``MockerEngine``: a simulated LLM that behaves like a real one (template code).

The project's ``engine.py`` (user-owned) subclasses it; this module is the template's, so
``copier update`` brings fixes and features here without touching the user's file.

It speaks the full ``LLMEngine`` contract with a real continuous-batching
scheduler, KV block pool with prefix caching, chunked prefill and preemption
(``mocker/``), Dynamo's perf model for timing, and a PyTorch workload per
forward pass on the GPU when there is one. Token ids are deterministic draws in
``[1000, 2000)`` (given ``--seed`` and the prompt).

Per request (``generate``): a channel is registered with the scheduler and a
``RequestGuard`` frees the request's KV blocks and removes it from the
scheduler on every exit path (finish, error, cancel, dropped stream). The
stream checks ``ctx.is_stopped()`` first on every iteration (cancellation wins
over tokens already waiting), then takes the next token from the channel and
yields it as one item, or awaits the channel: one token per item, as a real
engine step gives each running sequence one token, also when the stream lags
behind the scheduler. ``--merge-lagging-tokens`` (off by default) instead takes
every token the channel holds into one item, which saves work per token but
hides the per-token cost from the frontend and the client. One watcher task per
request (never one per token) wakes that await when the context is stopped, so
a stop always ends the stream with a clean ``cancelled`` terminal whose usage
counts exactly the streamed tokens.

Roles: prefill (one token, handoff in ``disaggregated_params``), decode
(needs the prefill peer's result; waits ``--kv-transfer-time-ms`` to simulate
the KV transfer, then decodes without recomputing the prompt), aggregated.

KV-aware routing: the KV cache reports every block it stores or evicts to a
``KvEventPublisher`` (``kv_event_sources``), and a snapshot task pushes the
cache usage (``dynamo_component_*`` gauges, the router's load signal) every
``SNAPSHOT_INTERVAL_S`` while it changes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Self

from backend_common import (
    DisaggregationMode,
    EngineConfig,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    RequestGuard,
    WorkerConfig,
    usage,
)
from backend_common.disagg import enforce_prefill_max_tokens, require_prefill_result
from backend_common.errors import engine_shutdown, invalid_arg
from backend_common.kv_events import (
    ComponentSnapshot,
    KvEventPublisher,
    PushSource,
    SnapshotPublisher,
)
from backend_common.types import mark_as_probe
from prometheus_client import CollectorRegistry, Gauge

from . import metrics
from .args import DEFAULT_MODEL_NAME, MockerSettings, add_mocker_args, build_engine
from .channel import TokenChannel
from .device import DeviceWorkload
from .scheduler import Scheduler, SchedulerConfig, Sequence
from .timing import TimingModel

__all__ = ["MockerEngine"]

log = logging.getLogger(__name__)

# How often the cache usage snapshot is pushed (only when it changed).
SNAPSHOT_INTERVAL_S = 0.1


async def _interrupt_on_stop(ctx: GenerateContext, channel: TokenChannel) -> None:
    """Per request: wake the stream's channel wait when ``ctx`` is stopped (or already was)."""
    await ctx.stopped()
    channel.interrupt()


async def _simulated_transfer(ctx: GenerateContext, channel: TokenChannel, seconds: float) -> None:
    """The decode role's KV transfer: ``seconds`` of waiting that a stop ends early."""
    try:
        async with asyncio.timeout(seconds):
            while not ctx.is_stopped():
                await channel.wait()  # nothing is pushed yet: only the stop watcher wakes it
    except TimeoutError:
        pass


class _KvEvents:
    """Forwards the KV cache's stored/removed blocks to the worker's publisher."""

    def __init__(self, publisher: KvEventPublisher) -> None:
        self.publisher = publisher

    def stored(
        self, block_hashes: list[int], parent_hash: int | None, token_ids: list[int]
    ) -> None:
        sizes = [len(token_ids) // len(block_hashes)] * len(block_hashes)
        self.publisher.publish_stored(token_ids, sizes, block_hashes, parent_hash)

    def removed(self, block_hashes: list[int]) -> None:
        self.publisher.publish_removed(block_hashes)


class MockerEngine(LLMEngine):
    DEFAULT_DEVICE = "cpu"
    """Where the per-pass workload runs unless ``--device`` says otherwise ("cuda" falls back
    to cpu, with a warning, on a machine without a GPU). The project's subclass sets it."""

    def __init__(
        self,
        settings: MockerSettings | None = None,
        *,
        model: str = DEFAULT_MODEL_NAME,
        mode: DisaggregationMode | str = DisaggregationMode.AGGREGATED,
    ) -> None:
        self.settings = settings or MockerSettings()
        self.model = model or DEFAULT_MODEL_NAME
        self.mode = DisaggregationMode.parse(mode)
        self.timing = TimingModel(self.settings.speedup_ratio)
        self.scheduler: Scheduler | None = None
        self.device: DeviceWorkload | None = None
        self._active: dict[str, GenerateContext] = {}
        self._kv_publisher: KvEventPublisher | None = None
        # Disaggregated handoffs: produced (prefill role) or received (decode role).
        self.handoffs = 0
        self._snapshots: SnapshotPublisher | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        add_mocker_args(parser, default_device=cls.DEFAULT_DEVICE)

    @classmethod
    def from_config(cls, args: argparse.Namespace, config: WorkerConfig) -> Self:
        return build_engine(args, config, cls)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, worker_id: int) -> EngineConfig:
        if self._started:
            raise engine_shutdown("mocker backend already started")
        if self._closing:
            raise engine_shutdown("mocker backend is shutting down")
        self._started = True
        s = self.settings
        if s.startup_time > 0:
            await asyncio.sleep(s.startup_time)
        # Importing torch and allocating on the device can take seconds: off the loop.
        self.device = await asyncio.to_thread(
            DeviceWorkload,
            s.device,
            hidden_size=s.hidden_size,
            max_rows=s.max_num_batched_tokens,
            seed=s.seed,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=s.num_gpu_blocks,
                block_size=s.block_size,
                max_num_seqs=s.max_num_seqs,
                max_num_batched_tokens=s.max_num_batched_tokens,
                enable_prefix_caching=s.enable_prefix_caching,
                enable_chunked_prefill=s.enable_chunked_prefill,
                watermark=s.watermark,
            ),
            timing=self.timing,
            device=self.device,
            seed=s.seed,
        )
        if self._kv_publisher is not None:
            self.scheduler.kv.events = _KvEvents(self._kv_publisher)
        self.scheduler.start()
        log.info(
            "mocker backend started (num_gpu_blocks=%d, block_size=%d, speedup_ratio=%s, "
            "device=%s, mode=%s)",
            s.num_gpu_blocks,
            s.block_size,
            s.speedup_ratio,
            self.device.device,
            self.mode.value,
        )
        return EngineConfig(
            model=self.model,
            served_model_name=self.model,
            context_length=s.context_length,
            kv_cache_block_size=s.block_size,
            total_kv_blocks=s.num_gpu_blocks,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
        )

    async def cleanup(self) -> None:
        """Stop every stream with a clean ``cancelled`` terminal, then the scheduler."""
        self._closing = True
        if self._snapshot_task is not None:
            self._snapshot_task.cancel()
        # Stop the contexts first: each stream then sees "stopped" before "channel closed".
        for ctx in list(self._active.values()):
            ctx.stop_generating()
        scheduler = self.scheduler
        if scheduler is not None:
            await scheduler.stop()
        if self.device is not None:
            self.device.close()
        log.info("mocker backend: cleanup invoked")

    async def abort(self, ctx: GenerateContext) -> None:
        # The stream itself observes the stop and its guard frees the blocks.
        log.debug("mocker backend: abort requested for %s", ctx.id())

    # -- requests ----------------------------------------------------------------------
    def _limit_max_tokens(self, request: PreprocessedRequest) -> int:
        """The request's max_tokens after defaults and the context / KV capacity limits.

        The worker has already refused an empty prompt, one that fills the context and a
        ``max_tokens`` of 0 (``backend_common.request_policy``, against the ``EngineConfig``
        of ``start``); what is left to refuse is this worker's own KV capacity.
        """
        s = self.settings
        prompt_len = len(request.token_ids)
        assert self.scheduler is not None
        requested = request.stop_conditions.max_tokens
        if requested is None:
            requested = s.default_max_tokens
        capacity = self.scheduler.max_sequence_tokens - prompt_len + 1
        if capacity < 1:
            raise invalid_arg(
                f"prompt has {prompt_len} tokens; this worker's KV cache holds at most "
                f"{self.scheduler.max_sequence_tokens} per sequence"
            )
        return min(requested, s.context_length - prompt_len, capacity)

    def _request_id(self, ctx: GenerateContext) -> str:
        request_id = ctx.id()
        if request_id in self._active:
            request_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        return request_id

    @staticmethod
    def _handle(ctx: GenerateContext) -> str:
        try:
            return str(uuid.UUID(ctx.id()))
        except ValueError:
            return str(uuid.uuid4())

    def _kv_transfer_seconds(self) -> float:
        ratio = self.settings.speedup_ratio
        return 0.0 if ratio == 0 else self.settings.kv_transfer_time_ms / 1000.0 / ratio

    def _release(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        if self.scheduler is not None:
            self.scheduler.remove(request_id)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if not self._started or self.scheduler is None:
            raise engine_shutdown("generate called before start")
        if self._closing:
            raise engine_shutdown("mocker backend is shutting down")
        if self.mode is DisaggregationMode.PREFILL:
            enforce_prefill_max_tokens(request)
        kv_transferred = False
        if self.mode is DisaggregationMode.DECODE:
            kv_transferred = require_prefill_result(request, self.mode) is not None
            if kv_transferred and not request.is_probe:
                self.handoffs += 1
        prompt_len = len(request.token_ids)
        max_tokens = self._limit_max_tokens(request)
        if max_tokens == 0 or ctx.is_stopped():
            final = LLMEngineOutput.cancelled() if ctx.is_stopped() else LLMEngineOutput.length()
            yield final.with_usage(usage(prompt_len, 0))
            return
        sc = request.stop_conditions
        try:
            seq = Sequence.new(
                self._request_id(ctx),
                request.token_ids,
                max_tokens=max_tokens,
                seed=self.settings.seed,
                min_tokens=sc.min_tokens or 0,
                ignore_eos=bool(sc.ignore_eos),
                eos_token_ids=request.eos_token_ids,
                stop_token_ids=sc.stop_token_ids,
                sampling_seed=request.sampling_options.seed,
                kv_transferred=kv_transferred,
            )
        except ValueError as exc:
            raise invalid_arg(str(exc)) from exc

        request_id = seq.request_id
        channel = seq.channel
        merge = self.settings.merge_lagging_tokens
        self._active[request_id] = ctx
        generated = 0
        watcher = asyncio.get_running_loop().create_task(_interrupt_on_stop(ctx, channel))
        with RequestGuard(lambda: self._release(request_id)):
            try:
                if kv_transferred and self.settings.kv_transfer_time_ms > 0:
                    await _simulated_transfer(ctx, channel, self._kv_transfer_seconds())
                try:
                    self.scheduler.add(seq)
                except ValueError as exc:
                    raise invalid_arg(str(exc)) from exc
                except RuntimeError as exc:
                    raise engine_shutdown("mocker backend is shutting down") from exc
                while True:
                    # Cancellation first: it wins over tokens that are already waiting.
                    if ctx.is_stopped():
                        yield LLMEngineOutput.cancelled().with_usage(usage(prompt_len, generated))
                        return
                    if not channel.ready:
                        await channel.wait()
                        continue  # woken by tokens, a close or a stop: check the stop first
                    tokens = channel.take() if merge else channel.take_one()
                    if not tokens:
                        raise engine_shutdown(
                            "mocker backend: scheduler stopped before the request completed"
                        )
                    generated += len(tokens)
                    # finish is set with the last token: it applies once that one is taken.
                    finish = channel.finish if not channel else None
                    if finish is None:
                        yield LLMEngineOutput(tokens)
                        continue
                    final = LLMEngineOutput(tokens, finish)
                    final.with_usage(usage(prompt_len, generated))
                    if self.mode is DisaggregationMode.PREFILL:
                        self.handoffs += 1
                        final.disaggregated_params = {
                            "mocker_handle": self._handle(ctx),
                            "completed_tokens": list(tokens),
                        }
                    yield final
                    return
            finally:
                watcher.cancel()

    # -- worker hooks -------------------------------------------------------------------
    async def health_check_payload(self) -> dict[str, Any] | None:
        payload: dict[str, Any] = {
            "token_ids": [1],
            "stop_conditions": {"max_tokens": 1, "ignore_eos": True},
            "sampling_options": {"temperature": 0.0},
        }
        if self.mode is DisaggregationMode.DECODE:
            payload["prefill_result"] = {"disaggregated_params": {}}
        return mark_as_probe(payload)

    async def setup_metrics(self, registry: CollectorRegistry) -> None:
        metrics.register(registry, lambda: self.scheduler)
        Gauge(
            "mocker_disagg_handoffs",
            "KV handoffs produced (prefill role) or received in prefill_result (decode role)",
            registry=registry,
        ).set_function(lambda: self.handoffs)

    async def kv_event_sources(self) -> list[Any]:
        if not self.settings.enable_prefix_caching:
            return []  # nothing is ever reusable: the router has nothing to match
        return [PushSource(self._attach_kv_publisher, dp_rank=0)]

    def _attach_kv_publisher(self, publisher: KvEventPublisher) -> None:
        # Called once by the worker, after start(): hook the live cache up.
        self._kv_publisher = publisher
        if self.scheduler is not None:
            self.scheduler.kv.events = _KvEvents(publisher)

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0]

    def attach_snapshot_publisher(self, publisher: SnapshotPublisher) -> None:
        self._snapshots = publisher
        self._snapshot_task = asyncio.get_running_loop().create_task(self._push_snapshots())

    async def _push_snapshots(self) -> None:
        last: tuple[int, int] | None = None
        while not self._closing:
            scheduler, publisher = self.scheduler, self._snapshots
            if scheduler is not None and publisher is not None:
                stats = scheduler.kv.stats()
                key = (stats.used_blocks, stats.prefix_queries)
                if key != last:
                    last = key
                    publisher.publish(
                        0,
                        ComponentSnapshot(
                            kv_used_blocks=stats.used_blocks,
                            kv_total_blocks=stats.num_blocks,
                            gpu_cache_usage=stats.utilisation,
                            dp_rank=0,
                            kv_cache_hit_rate=stats.hit_rate if stats.prefix_queries else None,
                        ),
                    )
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
