"""KV routing wiring: hand an engine its KV event and snapshot publishers (worker start-up).

docs/contract.md#kv-events-and-snapshots. ``setup_kv_routing`` is called once by the worker,
only when KV routing is on, after ``engine.setup_metrics`` and before the worker registers,
so an engine has its publishers before the first request can arrive. It opens the event plane
with the configured transport and connects it to the engine's optional hooks.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from ...config import EngineConfig, WorkerConfig
from ...engine import LLMEngine
from ...kv_events import PushSource, ZmqSource
from .plane import EventPlane, EventTransport
from .publishers import GaugeSnapshotPublisher
from .relay import ZmqKvRelay, ZmqSourceMetrics
from .transports import NatsTransport, ZmqTransport

__all__ = ["open_transport", "setup_kv_routing"]

log = logging.getLogger(__name__)


async def open_transport(config: WorkerConfig) -> EventTransport | None:
    """The event plane's transport ``config.event_plane`` names, or None (with a warning).

    Unset means ZMQ: 1.6.1 publishes on ZMQ when no plane is named, also with NATS_SERVER set
    (observed).
    """
    kind = config.event_plane or "zmq"
    if kind == "nats":
        return await NatsTransport.connect(config.nats_server)
    if kind == "zmq":
        return ZmqTransport(config.event_plane_host)
    log.warning(
        "event plane %r is not supported (use zmq or nats): "
        "no KV events or load metrics reach the KV router",
        kind,
    )
    return None


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
    opens the event plane if either asks for it (``open_transport``); hands each
    ``PushSource`` its ``KvEventPublisher``, starts a ``ZmqKvRelay`` for each ``ZmqSource``
    (stopped by the plane's ``close()``; one that cannot start closes the plane and raises)
    and, when ranks were declared, calls ``engine.attach_snapshot_publisher`` once with a
    ``SnapshotPublisher``. Returns the event plane (its ``records`` go to discovery) or None
    when nothing is published. A source that is neither a ``PushSource`` nor a ``ZmqSource``
    raises ``TypeError``.
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
    transport = await open_transport(config)
    plane = None
    if transport is not None:
        plane = EventPlane(
            transport, config.namespace, config.component, config.endpoint, worker_id
        )
        if sources:
            await _connect_sources(plane, sources, engine_config, registry, labels)
    if ranks:
        engine.attach_snapshot_publisher(
            GaugeSnapshotPublisher(registry, labels, ranks, plane.load if plane else None)
        )
    return plane


async def _connect_sources(
    plane: EventPlane,
    sources: list[PushSource | ZmqSource],
    engine_config: EngineConfig,
    registry: CollectorRegistry,
    labels: dict[str, str],
) -> None:
    """One publisher per source: handed to a ``PushSource``, fed by a relay for a ``ZmqSource``."""
    block_size = engine_config.kv_cache_block_size
    if not block_size:
        log.warning("EngineConfig.kv_cache_block_size is not set: KV events are disabled")
        return
    zmq_metrics: ZmqSourceMetrics | None = None
    for src in sources:
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
