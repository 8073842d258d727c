"""Framework metrics of a worker (docs/wire-protocol.md#metrics,
docs/contract.md#metrics).

One ``WorkerMetrics`` per worker, built after ``engine.start()`` returns. It owns
a ``prometheus_client.CollectorRegistry`` (``registry``), which is also handed to
``engine.setup_metrics(registry)`` so engine metrics appear on the same
``/metrics`` page of the status server.

Series (all with the labels ``dynamo_namespace``, ``dynamo_component``,
``dynamo_endpoint``, ``model``, ``model_name``, ``worker_id`` (hex) plus
``WorkerConfig.metrics_labels``;
labels whose value is empty are left out, as Dynamo does):

* lifecycle gauges, present from construction (0 until set, each set once):
  ``dynamo_component_model_load_time_seconds``, ``..._drain_time_seconds``,
  ``..._cleanup_time_seconds``;
* request metrics, updated by the request adapter for every request:
  ``dynamo_component_inflight_requests`` (gauge), ``dynamo_component_requests_total``
  (counter), ``dynamo_component_request_duration_seconds`` (histogram).

Callers: the worker sets the lifecycle gauges; the adapter calls
``request_started()`` when a request is admitted and ``request_finished(seconds)``
exactly once when its stream ends (normally, with an error, or cancelled).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["PREFIX", "WorkerMetrics"]

PREFIX = "dynamo_component_"

MODEL_LOAD_HELP = "Time engine.start() took to return. Set once at Worker setup."
DRAIN_HELP = (
    "Time spent draining in-flight work before cleanup. "
    "Stays at 0 for engines without a drain hook."
)
CLEANUP_HELP = (
    "Time spent releasing engine resources during shutdown. "
    "Set by the framework once after engine.cleanup() returns."
)
# LLM requests run from milliseconds to minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics:
    """Lifecycle gauges and request metrics on a registry of their own."""

    def __init__(
        self,
        *,
        namespace: str,
        component: str,
        endpoint: str,
        model: str,
        model_name: str | None = None,
        worker_id: int | None = None,
        extra_labels: Iterable[tuple[str, str]] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        pairs = [
            ("dynamo_namespace", namespace),
            ("dynamo_component", component),
            ("dynamo_endpoint", endpoint),
            ("model", model),
            ("model_name", model_name or model),
            # The discovery instance id in hex, as Dynamo labels its workers' series.
            ("worker_id", f"{worker_id:x}" if worker_id is not None else ""),
            *extra_labels,
        ]
        labels: dict[str, str] = {}
        for key, value in pairs:
            if value and key not in labels:
                labels[key] = str(value)
        self.labels = labels
        names = list(labels)

        def gauge(short: str, doc: str) -> Gauge:
            return Gauge(PREFIX + short, doc, names, registry=self.registry).labels(**labels)

        self._model_load = gauge("model_load_time_seconds", MODEL_LOAD_HELP)
        self._drain = gauge("drain_time_seconds", DRAIN_HELP)
        self._cleanup = gauge("cleanup_time_seconds", CLEANUP_HELP)
        self._inflight = gauge("inflight_requests", "Requests currently being processed.")
        self._requests = Counter(
            PREFIX + "requests",  # prometheus_client appends _total
            "Requests processed by this worker's endpoint.",
            names,
            registry=self.registry,
        ).labels(**labels)
        self._duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from request admission to the end of its response stream.",
            names,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        ).labels(**labels)

    # -- lifecycle ----------------------------------------------------------------
    def set_model_load_time(self, seconds: float) -> None:
        self._model_load.set(seconds)

    def set_drain_time(self, seconds: float) -> None:
        self._drain.set(seconds)

    def set_cleanup_time(self, seconds: float) -> None:
        self._cleanup.set(seconds)

    # -- requests -----------------------------------------------------------------
    def request_started(self) -> None:
        self._requests.inc()
        self._inflight.inc()

    def request_finished(self, duration_s: float) -> None:
        self._inflight.dec()
        self._duration.observe(max(0.0, duration_s))

    # -- export -------------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition of everything on ``registry``."""
        return generate_latest(self.registry)
