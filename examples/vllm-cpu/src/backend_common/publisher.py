"""Per-rank KV cache snapshots: the ``dynamo_component_*`` gauges and the router's load signal.

docs/contract.md#kv-events-and-snapshots. An engine opts in by overriding two optional
hooks of ``LLMEngine``::

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0]                                   # the ranks it will report

    def attach_snapshot_publisher(self, publisher: SnapshotPublisher) -> None:
        self.snapshots = publisher                   # keep it

and then, whenever its cache statistics change (from any thread)::

    self.snapshots.publish(0, ComponentSnapshot(kv_used_blocks=12, kv_total_blocks=1000,
                                                gpu_cache_usage=0.012, dp_rank=0,
                                                kv_cache_hit_rate=0.5))

The worker calls ``component_metrics_dp_ranks()`` once after ``setup_metrics`` (only when
KV routing is on), builds one ``SnapshotPublisher`` and calls ``attach_snapshot_publisher``
exactly once. ``publish`` updates, for that rank:

* ``dynamo_component_total_blocks`` <- ``kv_total_blocks`` (seeded 0 per declared rank);
* ``dynamo_component_gpu_cache_usage_percent`` <- ``gpu_cache_usage`` (fraction 0..1; seeded 0);
* ``dynamo_component_kv_cache_hit_rate`` <- ``kv_cache_hit_rate`` only when it is not None
  (None = no measurement, the series stays absent; 0.0 is a real value);

and sends ``kv_used_blocks`` to the KV router (``kv_metrics`` topic) when the event plane is
up and the rank was declared. Labels: the worker's metric labels plus ``dp_rank``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge

if TYPE_CHECKING:
    from .kv_events import LoadPublisher

__all__ = ["ComponentSnapshot", "SnapshotPublisher"]

log = logging.getLogger(__name__)

PREFIX = "dynamo_component_"


@dataclass
class ComponentSnapshot:
    """One rank's KV cache state. ``kv_cache_hit_rate`` is tri-state (None = no data)."""

    kv_used_blocks: int
    kv_total_blocks: int
    gpu_cache_usage: float
    dp_rank: int
    kv_cache_hit_rate: float | None = None


class SnapshotPublisher:
    """Owns the per-rank gauges and forwards ``kv_used_blocks`` to the router. Thread-safe."""

    def __init__(
        self,
        registry: CollectorRegistry,
        labels: dict[str, str],
        dp_ranks: list[int],
        load: LoadPublisher | None = None,
    ) -> None:
        self.dp_ranks = sorted({int(r) for r in dp_ranks})
        self._labels = dict(labels)
        names = [*self._labels, "dp_rank"]
        self._total = Gauge(
            PREFIX + "total_blocks",
            "Total number of KV cache blocks available on the worker.",
            names,
            registry=registry,
        )
        self._usage = Gauge(
            PREFIX + "gpu_cache_usage_percent",
            "GPU cache usage as a percentage (0.0-1.0).",
            names,
            registry=registry,
        )
        self._hit = Gauge(
            PREFIX + "kv_cache_hit_rate",
            "Prefix cache hit rate (0.0-1.0). Portable across engines.",
            names,
            registry=registry,
        )
        self._load = load
        self._lock = threading.Lock()
        for rank in self.dp_ranks:
            self._total.labels(**self._labels, dp_rank=str(rank)).set(0)
            self._usage.labels(**self._labels, dp_rank=str(rank)).set(0.0)

    def publish(self, dp_rank: int, snapshot: ComponentSnapshot) -> None:
        """Record ``snapshot`` for ``dp_rank`` (see the module docstring). Never raises on I/O."""
        rank = str(int(dp_rank))
        with self._lock:
            self._total.labels(**self._labels, dp_rank=rank).set(int(snapshot.kv_total_blocks))
            self._usage.labels(**self._labels, dp_rank=rank).set(float(snapshot.gpu_cache_usage))
            if snapshot.kv_cache_hit_rate is not None:
                self._hit.labels(**self._labels, dp_rank=rank).set(
                    float(snapshot.kv_cache_hit_rate)
                )
        if self._load is not None and int(dp_rank) in self.dp_ranks:
            self._load.publish(int(dp_rank), int(snapshot.kv_used_blocks))
