"""KV routing wiring: hand an engine its KV event and snapshot publishers (worker start-up).

``setup_kv_routing`` is called once by the worker, only when KV routing is on, after
``engine.setup_metrics`` and before the worker registers, so an engine has its publishers
before the first request can arrive. The publishers themselves (what an engine calls) live
in ``backend_common.kv_events`` and ``backend_common.publisher``; this module only connects
them to the event plane and to the engine's optional hooks.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from ..config import EngineConfig, WorkerConfig
from ..engine import LLMEngine
from ..kv_events import EventPlane, PushSource, ZmqSource
from ..publisher import SnapshotPublisher

__all__ = ["setup_kv_routing"]

log = logging.getLogger(__name__)


async def setup_kv_routing(
    engine: LLMEngine,
    config: WorkerConfig,
    engine_config: EngineConfig,
    worker_id: int,
    registry: CollectorRegistry,
    labels: dict[str, str],
) -> EventPlane | None:
    """Connect the engine's KV event sources and snapshot hook to the event plane.

    Calls ``engine.kv_event_sources()`` and ``engine.component_metrics_dp_ranks()`` once;
    connects the NATS event plane if either asks for it; hands each ``PushSource`` its
    ``KvEventPublisher`` and, when ranks were declared, calls
    ``engine.attach_snapshot_publisher`` once with a ``SnapshotPublisher``. Returns the event
    plane (its ``records`` go to discovery) or None when nothing is published. A source that
    is neither a ``PushSource`` nor a ``ZmqSource`` raises ``TypeError``.
    """
    sources = list(await engine.kv_event_sources() or [])
    for src in sources:
        if not isinstance(src, PushSource | ZmqSource):
            raise TypeError(
                f"kv_event_sources() returned unknown descriptor type {type(src).__name__}; "
                "expected ZmqSource or PushSource"
            )
    ranks = [int(r) for r in engine.component_metrics_dp_ranks() or []]
    if not sources and not ranks:
        return None
    plane: EventPlane | None = None
    # args.py resolves an unset plane: nats when NATS_SERVER is set (as Dynamo does).
    kind = config.event_plane
    if kind == "nats":
        plane = await EventPlane.connect(
            config.nats_server, config.namespace, config.component, config.endpoint, worker_id
        )
    else:
        log.warning(
            "event plane %r is not supported by backend_common (use --event-plane nats): "
            "no KV events or load metrics reach the KV router",
            kind,
        )
    block_size = engine_config.kv_cache_block_size
    for src in sources:
        if isinstance(src, ZmqSource):
            log.warning("ZmqSource is not supported; rank %s publishes no KV events", src.dp_rank)
            continue
        if plane is None:
            continue
        if not block_size:
            log.warning("EngineConfig.kv_cache_block_size is not set: KV events are disabled")
            break
        src.on_ready(plane.kv_publisher(int(src.dp_rank), int(block_size)))
    if ranks:
        engine.attach_snapshot_publisher(
            SnapshotPublisher(registry, labels, ranks, plane.load if plane else None)
        )
    return plane
