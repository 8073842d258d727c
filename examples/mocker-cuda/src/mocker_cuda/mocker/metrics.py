"""Prometheus gauges of the mocker, served on the worker's ``/metrics``.

``register(registry, get_scheduler)`` is called by the engine's
``setup_metrics``; it may be called again with another registry (the
conformance kit does), so every call builds new collectors on the registry it
is given and nothing is global. Values are read when Prometheus scrapes
(``Gauge.set_function``) from whatever scheduler ``get_scheduler()`` returns:
no background task, nothing to stop, and zeros before ``start()``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge

from .scheduler import Scheduler

__all__ = ["METRIC_NAMES", "register"]

# name -> (help, reader of a live scheduler)
_GAUGES: dict[str, tuple[str, Callable[[Scheduler], float]]] = {
    "mocker_kv_blocks_used": ("KV cache blocks in use", lambda s: s.kv.used_blocks),
    "mocker_kv_blocks_total": ("KV cache blocks in the pool", lambda s: s.kv.num_blocks),
    "mocker_requests_running": ("Requests in the running queue", lambda s: s.num_running),
    "mocker_requests_waiting": ("Requests in the waiting queue", lambda s: s.num_waiting),
    "mocker_prefix_cache_hit_rate": (
        "Prefix cache hit rate (cached / queried full prompt blocks)",
        lambda s: s.kv.stats().hit_rate,
    ),
    "mocker_step_time_ms": ("Wall time of the latest forward pass (ms)", lambda s: s.last_step_ms),
    "mocker_steps": ("Forward passes run", lambda s: s.steps),
    "mocker_preemptions": ("Sequences preempted for lack of KV blocks", lambda s: s.preemptions),
}

METRIC_NAMES = tuple(_GAUGES)


def register(
    registry: CollectorRegistry, get_scheduler: Callable[[], Scheduler | None]
) -> list[Gauge]:
    """Register every mocker gauge on ``registry``; each reads ``get_scheduler()`` live."""
    gauges = []
    for name, (help_text, read) in _GAUGES.items():
        gauge = Gauge(name, help_text, registry=registry)

        def value(read: Callable[[Scheduler], float] = read) -> float:
            scheduler = get_scheduler()
            return float(read(scheduler)) if scheduler is not None else 0.0

        gauge.set_function(value)
        gauges.append(gauge)
    return gauges
