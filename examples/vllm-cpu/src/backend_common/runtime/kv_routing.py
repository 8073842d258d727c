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
from ..zmq_event_plane import ZmqEventPlane
from .zmq_source import ZmqKvRelay, ZmqSourceMetrics

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
    connects the event plane if either asks for it (``config.event_plane``; unset: ZMQ, as in
    1.6.1); hands each ``PushSource`` its ``KvEventPublisher``, starts a ``ZmqKvRelay`` for
    each ``ZmqSource`` (stopped by the plane's ``close()``; one that cannot start closes the
    plane and raises) and, when ranks were declared, calls
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
    # 1.6.1 publishes on ZMQ when no plane is named, also with NATS_SERVER set (observed).
    kind = config.event_plane or "zmq"
    ns, comp, ep = config.namespace, config.component, config.endpoint
    if kind == "nats":
        plane = await EventPlane.connect(config.nats_server, ns, comp, ep, worker_id)
    elif kind == "zmq":
        plane = await ZmqEventPlane.connect(config.event_plane_host, ns, comp, ep, worker_id)
    else:
        log.warning(
            "event plane %r is not supported (use zmq or nats): "
            "no KV events or load metrics reach the KV router",
            kind,
        )
    block_size = engine_config.kv_cache_block_size
    zmq_metrics: ZmqSourceMetrics | None = None
    for src in sources:
        if plane is None:
            continue
        if not block_size:
            log.warning("EngineConfig.kv_cache_block_size is not set: KV events are disabled")
            break
        publisher = plane.kv_publisher(int(src.dp_rank), int(block_size))
        if isinstance(src, PushSource):
            src.on_ready(publisher)
            continue
        zmq_metrics = zmq_metrics or ZmqSourceMetrics(registry, labels)
        relay = ZmqKvRelay(src, publisher, zmq_metrics)
        try:
            relay.start()
        except BaseException:
            await plane.close()  # stops the relays already started, closes the sockets
            raise
        plane.on_close(relay.stop)
    if ranks:
        engine.attach_snapshot_publisher(
            SnapshotPublisher(registry, labels, ranks, plane.load if plane else None)
        )
    return plane
