"""Prometheus metrics of the transformers engine, served on the worker's ``/metrics``.

``register(registry, get_core)`` is called by the engine's ``setup_metrics`` (maybe again
with another registry: the conformance kit does), so every call builds new collectors on
the registry it is given. Gauges read the core's latest ``CoreStats`` when scraped; the
step-time histogram is observed on the compute thread (prometheus-client is thread-safe).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge, Histogram

from .core import STEP_BUCKETS_S, CoreStats, EngineCore

__all__ = ["METRIC_NAMES", "register"]

_GAUGES: dict[str, tuple[str, Callable[[CoreStats], float]]] = {
    "hf_requests_running": ("Requests in the running batch", lambda s: s.running),
    "hf_requests_waiting": ("Requests queued for the batch", lambda s: s.waiting),
    "hf_kv_blocks_used": ("KV cache blocks held by live requests", lambda s: s.kv_used_blocks),
    "hf_kv_blocks_total": ("KV cache blocks in the paged cache", lambda s: s.kv_total_blocks),
    "hf_kv_usage": ("Share of KV cache blocks held by live requests", lambda s: s.kv_usage),
    "hf_steps": ("Forward steps run", lambda s: s.steps),
}

METRIC_NAMES = (*_GAUGES, "hf_step_seconds")


def register(registry: CollectorRegistry, get_core: Callable[[], EngineCore | None]) -> None:
    for name, (help_text, read) in _GAUGES.items():
        gauge = Gauge(name, help_text, registry=registry)

        def value(read: Callable[[CoreStats], float] = read) -> float:
            core = get_core()
            return float(read(core.stats)) if core is not None else 0.0

        gauge.set_function(value)
    histogram = Histogram(
        "hf_step_seconds",
        "Wall time of one forward step (batch build, forward, sampling)",
        buckets=STEP_BUCKETS_S,
        registry=registry,
    )
    core = get_core()
    if core is not None:
        previous = core.on_step

        def observe(seconds: float) -> None:
            histogram.observe(seconds)
            if previous is not None:
                previous(seconds)

        core.on_step = observe
