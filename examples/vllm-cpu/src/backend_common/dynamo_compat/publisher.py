"""``dynamo.common.backend.publisher``: KV event source descriptors and ``ComponentSnapshot``.

``ZmqSource`` and ``PushSource`` are ``backend_common.kv_events``' own descriptors (the same
fields as 1.6.1's), so what a 1.6.1 engine's ``kv_event_sources()`` returns reaches the
worker unchanged. ``ComponentSnapshot`` is the per-rank payload an engine hands to the
snapshot publisher it received in ``attach_snapshot_publisher``; the worker's publisher reads
its fields by name (``kv_used_blocks`` goes to the KV router, the rest to the
``dynamo_component_*`` gauges). ``kv_cache_hit_rate`` ``None`` means "no measurement".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kv_events import PushSource, ZmqSource

__all__ = ["ComponentSnapshot", "KvEventSource", "PushSource", "ZmqSource"]


@dataclass
class ComponentSnapshot:
    kv_used_blocks: int
    kv_total_blocks: int
    gpu_cache_usage: float
    dp_rank: int
    kv_cache_hit_rate: float | None = None


KvEventSource = ZmqSource | PushSource
