"""The ``LLMEngine`` contract: the one class a backend author writes.

Call order, all by the worker (``run``), never concurrently unless stated:

1. ``from_args(argv)`` once, before anything else: parse flags, build the
   engine (not started) and its ``WorkerConfig``. Sync or async.
2. ``await start(worker_id)`` exactly once. After it returns the engine must
   accept concurrent ``generate`` calls. ``worker_id`` is the discovery
   instance id: opaque, unique per replica.
3. ``await setup_metrics(registry)`` once; then, only when KV routing is on,
   ``await kv_event_sources()`` and ``component_metrics_dp_ranks()`` once each,
   and ``attach_snapshot_publisher(publisher)`` once if ranks were declared;
   then ``await health_check_payload()``.
4. Serving: ``generate(request, ctx)`` concurrently, once per request.
   ``abort(ctx)`` at most once per request, only when the client or operator
   cancelled it (never on a natural finish, never on a silent drop).
5. Shutdown: ``await drain()`` once, after the worker left discovery and the
   grace period passed; then ``await cleanup()`` exactly once if ``start`` was
   called (also when ``start`` raised). ``cleanup`` must be idempotent and safe
   on a never-started engine.

Stream rules for ``generate`` (checked by the debug validator and the
conformance kit): yield non-terminal items (``chunk.token(id)``), then exactly
one terminal item (``finish_reason`` set) as the last item, or raise a
``DynamoError``. On ``ctx.is_stopped()`` end with ``LLMEngineOutput.cancelled()``.
Resources that must be freed on every exit path belong in a ``RequestGuard``
(or ``try/finally``) inside ``generate``, not in ``abort``; its release callback
may be async (``lambda: engine.abort_request(id)``). An engine that computes on
its own threads hands results to the stream through a ``ThreadFeed`` (never
blocking the loop) and reads cancellation from it on those threads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .config import EngineConfig, WorkerConfig
from .context import GenerateContext
from .types import LLMEngineOutput, PreprocessedRequest

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .kv_events import PushSource, SnapshotPublisher, ZmqSource

__all__ = ["LLMEngine"]


class LLMEngine(ABC):
    """Token-in, token-out engine. Subclass it and implement start/generate/cleanup."""

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> tuple[LLMEngine, WorkerConfig]:
        """Parse ``argv`` (``None`` = ``sys.argv[1:]``) into an engine and its worker config.

        Not abstract so that engines built in code (tests, the conformance kit)
        need not define it; ``run`` needs it, or an ``engine_factory``.
        """
        raise TypeError(
            f"{cls.__name__}.from_args is not defined; implement it or pass engine_factory to run()"
        )

    @abstractmethod
    async def start(self, worker_id: int) -> EngineConfig:
        """Bring the engine up and describe it. Called exactly once."""

    @abstractmethod
    def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        """An async generator of output items for one request (see the stream rules)."""

    async def abort(self, ctx: GenerateContext) -> None:  # noqa: B027 - optional hook
        """Out-of-band cancel notice, at most once per cancelled request. Default: nothing."""

    async def drain(self) -> None:  # noqa: B027 - optional hook
        """Pre-cleanup work while discovery and transports are still alive. Default: nothing."""

    @abstractmethod
    async def cleanup(self) -> None:
        """Release everything. Idempotent; safe before ``start``."""

    async def health_check_payload(self) -> dict[str, Any] | None:
        """A request body the worker may send itself as a health canary, or ``None``."""
        return None

    async def setup_metrics(self, registry: CollectorRegistry) -> None:  # noqa: B027
        """Register engine metrics on ``registry`` (served on ``/metrics``). Default: none.

        Called once per worker; must be safe to call again (the conformance kit does).
        """

    async def kv_event_sources(self) -> list[PushSource | ZmqSource]:
        """KV event sources, one per data-parallel rank (see ``kv_events``). Default: none.

        Called once, only when KV routing is on. Each ``PushSource`` gets its
        ``KvEventPublisher`` through ``on_ready`` before the worker registers.
        """
        return []

    def component_metrics_dp_ranks(self) -> list[int]:
        """The data-parallel ranks this engine reports KV cache snapshots for. Default: none.

        Called once, only when KV routing is on. A non-empty list makes the worker
        build one ``SnapshotPublisher`` (``kv_events``) and hand it to
        ``attach_snapshot_publisher``; an empty one means no ``dynamo_component_*``
        gauges and no load signal to the KV router.
        """
        return []

    def attach_snapshot_publisher(self, publisher: SnapshotPublisher) -> None:  # noqa: B027
        """Keep ``publisher`` to report KV cache snapshots (see ``kv_events``). Default: drop it.

        Called at most once, after ``component_metrics_dp_ranks`` returned ranks and
        before the first request. ``publisher.publish`` may be called from any thread.
        """
