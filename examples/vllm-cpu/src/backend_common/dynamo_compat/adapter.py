"""``DynamoEngineAdapter``: a 1.6.1-style engine as a ``backend_common.LLMEngine``.

The worker drives the adapter through our contract (docs/contract.md); the adapter calls the
1.6.1 engine as Dynamo 1.6.1's worker would:

* ``start(worker_id)``: the engine's ``start``; its ``EngineConfig`` (``llm`` flattened) becomes
  ours. Then hooks with nothing to serve them here are refused with ``InvalidArgument`` naming
  the hook (engine control or update keys, ``on_endpoint_ready``, a logits-processor spec,
  ``LlmRegistration.enable_eagle`` / ``max_gpu_lora_count``); the worker reports a failed
  start and still calls ``cleanup``.
* ``generate(request, ctx)``: the engine's ``generate`` with the request as the 1.6.1 dict
  (``PreprocessedRequest.to_dict()``: the keys the frontend sent) and a ``core.Context`` over
  ``ctx``. Each chunk dict becomes an ``LLMEngineOutput`` through ``LLMEngineOutput.from_dict``,
  the parser of the wire form; anything it refuses (not a dict, unknown keys, bad token ids or
  ``finish_reason``) ends the stream with a ``DynamoError`` (``Backend(Unknown)``, the
  engine's fault) naming the problem, never a crash. The stream rules (one terminal, last)
  are the worker's checks, as for any engine.
* ``abort(ctx)``: the engine's ``abort`` with a ``Context`` over the same request.
* ``drain()``: on a prefill worker only, polls ``is_quiescent()`` every ``poll_interval``
  (0.5 s) until it returns ``True`` or the budget passes: ``DYN_PREFILL_DRAIN_TIMEOUT_S``
  (30 s) capped at ``graceful_shutdown_timeout - 5`` and floored at 0, as 1.6.1's worker
  does between its grace period and ``cleanup``. ``None`` keeps polling (never frees early);
  an exception ends the drain. Aggregated, decode and encode workers are never polled.
* ``cleanup()``: the engine's ``cleanup``, only if ``start`` was called (1.6.1's guarantee).
* ``setup_metrics(registry)``: when the engine overrides ``register_prometheus``, it gets an
  ``EngineMetrics`` whose exposition-text callbacks are served on ``/metrics``.
* ``kv_event_sources()``: ``ZmqSource`` as is; each ``PushSource``'s ``on_ready`` receives a
  ``llm.KvEventPublisher`` (1.6.1's call shapes) over the worker's publisher. The snapshot
  hooks and ``health_check_payload`` pass through.

``adapt(engine, config)`` is the pair the worker needs: the adapter and ``config.to_native()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..args import prefill_drain_timeout_from_env
from ..config import DisaggregationMode
from ..config import EngineConfig as NativeEngineConfig
from ..config import WorkerConfig as NativeWorkerConfig
from ..context import GenerateContext
from ..engine import LLMEngine as NativeLLMEngine
from ..errors import BackendError, DynamoError, invalid_arg
from ..kv_events import KvEventPublisher as NativeKvEventPublisher
from ..kv_events import PushSource, ZmqSource
from ..types import LLMEngineOutput, PreprocessedRequest
from .core import Context
from .engine import BaseEngine, EngineConfig, LLMEngine, RawEngine
from .llm import KvEventPublisher
from .worker import WorkerConfig

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["DynamoEngineAdapter", "EngineMetrics", "adapt", "to_output"]

log = logging.getLogger(__name__)

DRAIN_POLL_INTERVAL_S = 0.5
# 1.6.1 keeps this much of the graceful shutdown timeout for cleanup after the drain.
CLEANUP_RESERVE_S = 5.0


def to_output(chunk: Any) -> LLMEngineOutput:
    """One 1.6.1 chunk dict as an output item; ``DynamoError`` (Backend Unknown) if malformed."""
    try:
        return LLMEngineOutput.from_dict(chunk)
    except (ValueError, TypeError) as exc:
        raise DynamoError(
            f"engine yielded a malformed chunk: {exc}", BackendError.Unknown
        ) from None


class EngineMetrics:
    """What 1.6.1's ``register_prometheus(metrics)`` receives, over our ``/metrics`` registry.

    ``register_prometheus_expfmt_callback(cb)``: ``cb()`` returns Prometheus exposition text,
    parsed and served at every scrape. ``register_prometheus_typed_callback`` feeds 1.6.1's
    OTLP metrics export, which this runtime does not have; it is accepted and not called.
    ``auto_labels`` are the worker's labels, for the engine to add to its samples.
    """

    def __init__(self, registry: CollectorRegistry, auto_labels: list[tuple[str, str]]) -> None:
        self._registry = registry
        self.auto_labels = auto_labels

    def register_prometheus_expfmt_callback(self, callback: Callable[[], str]) -> None:
        self._registry.register(_ExpositionCollector(callback))

    def register_prometheus_typed_callback(self, callback: Callable[[], Any]) -> None:
        log.debug("register_prometheus_typed_callback: no OTLP metrics export; not called")


class _ExpositionCollector:
    def __init__(self, callback: Callable[[], str]) -> None:
        self._callback = callback

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = self._callback()
        except Exception:  # noqa: BLE001 - a scrape must not fail for an engine's callback
            log.warning("engine metrics callback failed", exc_info=True)
            return
        yield from text_string_to_metric_families(text or "")


def _overrides(engine: BaseEngine, name: str) -> bool:
    return getattr(type(engine), name) is not getattr(BaseEngine, name)


class DynamoEngineAdapter(NativeLLMEngine):
    """Our ``LLMEngine`` over a 1.6.1 ``LLMEngine`` (see the module docstring)."""

    def __init__(
        self,
        engine: BaseEngine,
        config: WorkerConfig | None = None,
        *,
        graceful_shutdown_timeout: float = 30.0,
        poll_interval: float = DRAIN_POLL_INTERVAL_S,
    ) -> None:
        if isinstance(engine, RawEngine):
            raise invalid_arg(
                f"{type(engine).__name__} is a RawEngine (raw media requests): this runtime "
                "serves token engines (dynamo.common.backend.LLMEngine) only"
            )
        if not isinstance(engine, LLMEngine):
            raise TypeError(
                f"{type(engine).__name__} is not a dynamo.common.backend.LLMEngine subclass"
            )
        self.engine = engine
        self.mode = config.disaggregation_mode if config else DisaggregationMode.AGGREGATED
        self.labels = list(config.metrics_labels) if config else []
        self.graceful_shutdown_timeout = graceful_shutdown_timeout
        self.poll_interval = poll_interval
        self._started = False

    async def start(self, worker_id: int) -> NativeEngineConfig:
        self._started = True
        config = await self.engine.start(worker_id)
        if not isinstance(config, EngineConfig):
            raise TypeError(
                f"{type(self.engine).__name__}.start() returned {type(config).__name__}; "
                "expected dynamo.common.backend.EngineConfig"
            )
        await self._refuse_unmapped_hooks()
        return self._native_engine_config(config)

    async def _refuse_unmapped_hooks(self) -> None:
        engine, name = self.engine, type(self.engine).__name__
        controls = sorted(engine.supported_controls())
        if controls:
            raise invalid_arg(
                f"{name}.supported_controls() = {controls}: engine control routes have no "
                "equivalent on this runtime"
            )
        updates = sorted(engine.supported_updates())
        if updates:
            raise invalid_arg(
                f"{name}.supported_updates() = {updates}: engine update routes have no "
                "equivalent on this runtime"
            )
        if _overrides(engine, "on_endpoint_ready"):
            raise invalid_arg(
                f"{name}.on_endpoint_ready: this runtime has no Endpoint object to hand over"
            )
        if await self.engine.logits_processor_spec() is not None:
            raise invalid_arg(
                f"{name}.logits_processor_spec() returned a spec: logits processors are not "
                "carried to engines on this runtime"
            )

    def _native_engine_config(self, config: EngineConfig) -> NativeEngineConfig:
        llm = config.llm
        name = type(self.engine).__name__
        if llm is not None and llm.enable_eagle:
            raise invalid_arg(f"{name}: LlmRegistration.enable_eagle is not supported here")
        if llm is not None and llm.max_gpu_lora_count is not None:
            raise invalid_arg(f"{name}: LlmRegistration.max_gpu_lora_count is not supported here")
        facts: dict[str, Any] = {}
        if llm is not None:
            for field_name in (
                "context_length",
                "kv_cache_block_size",
                "total_kv_blocks",
                "max_num_seqs",
                "max_num_batched_tokens",
                "data_parallel_size",
                "data_parallel_start_rank",
                "bootstrap_host",
                "bootstrap_port",
            ):
                facts[field_name] = getattr(llm, field_name)
        return NativeEngineConfig(
            model=config.model,
            served_model_name=config.served_model_name,
            runtime_data=config.runtime_data,
            model_aliases=list(config.model_aliases),
            **facts,
        )

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        stream = self.engine.generate(request.to_dict(), Context(native=ctx))  # type: ignore[arg-type]
        try:
            async for chunk in stream:
                yield to_output(chunk)
        finally:
            await stream.aclose()

    async def abort(self, ctx: GenerateContext) -> None:
        await self.engine.abort(Context(native=ctx))

    def drain_budget(self) -> float:
        """Seconds ``drain`` polls ``is_quiescent`` (see the module docstring)."""
        cap = self.graceful_shutdown_timeout - CLEANUP_RESERVE_S
        return max(0.0, min(prefill_drain_timeout_from_env(), cap))

    async def drain(self) -> None:
        if self.mode is not DisaggregationMode.PREFILL:
            return
        budget = self.drain_budget()
        started = time.monotonic()
        announced = False
        while True:
            try:
                quiescent = await self.engine.is_quiescent()
            except Exception:  # noqa: BLE001 - a failing probe must not block shutdown
                log.warning("drain: is_quiescent() failed; proceeding with cleanup", exc_info=True)
                return
            elapsed = time.monotonic() - started
            if quiescent is True:
                if announced:
                    log.info("drain: exited (quiescent, elapsed=%.1fs)", elapsed)
                return
            if elapsed >= budget:
                log.warning("drain: timed out at %.1fs; proceeding with cleanup", elapsed)
                return
            if not announced:
                announced = True
                log.info(
                    "drain: waiting for prefill to quiesce; polling is_quiescent (timeout=%.1fs)",
                    budget,
                )
            await asyncio.sleep(min(self.poll_interval, max(budget - elapsed, 0.0)))

    async def cleanup(self) -> None:
        if self._started:
            await self.engine.cleanup()

    async def health_check_payload(self) -> dict[str, Any] | None:
        return await self.engine.health_check_payload()

    async def setup_metrics(self, registry: CollectorRegistry) -> None:
        if _overrides(self.engine, "register_prometheus"):
            await self.engine.register_prometheus(EngineMetrics(registry, self.labels))

    async def kv_event_sources(self) -> list[PushSource | ZmqSource]:
        sources = list(await self.engine.kv_event_sources() or [])
        out: list[Any] = []
        for src in sources:
            if isinstance(src, PushSource):
                out.append(PushSource(_compat_on_ready(src.on_ready), dp_rank=src.dp_rank))
            else:
                out.append(src)  # ZmqSource as is; anything else is refused by the worker
        return out

    def component_metrics_dp_ranks(self) -> list[int]:
        return list(self.engine.component_metrics_dp_ranks())

    def attach_snapshot_publisher(self, publisher: Any) -> None:
        self.engine.attach_snapshot_publisher(publisher)

    def __repr__(self) -> str:
        return f"DynamoEngineAdapter({type(self.engine).__name__})"


def _compat_on_ready(
    on_ready: Callable[[Any], None],
) -> Callable[[NativeKvEventPublisher], None]:
    def hand_over(publisher: NativeKvEventPublisher) -> None:
        on_ready(KvEventPublisher(publisher))

    return hand_over


def adapt(
    engine: BaseEngine, config: WorkerConfig
) -> tuple[DynamoEngineAdapter, NativeWorkerConfig]:
    """The adapter and our ``WorkerConfig`` for a 1.6.1 ``(engine, WorkerConfig)`` pair."""
    if not isinstance(config, WorkerConfig):
        raise TypeError(
            f"from_args returned {type(config).__name__} as its config; expected "
            "dynamo.common.backend.WorkerConfig"
        )
    native = config.to_native()
    adapter = DynamoEngineAdapter(
        engine, config, graceful_shutdown_timeout=native.graceful_shutdown_timeout
    )
    return adapter, native
