"""An engine's own Prometheus metrics on the worker's ``/metrics``, labelled as Dynamo does.

Engines such as vLLM and SGLang record into the global ``prometheus_client.REGISTRY`` and,
with several processes, into ``PROMETHEUS_MULTIPROC_DIR``; neither is the worker's registry
(``WorkerMetrics.registry``). ``scrape_registry(worker_registry, labels)`` returns the
registry the status server renders: the worker's metrics first, then the multiprocess
directory's (when the variable names a directory), then the global registry's. Each metric
family appears once: a name already emitted by an earlier source is skipped, so a metric an
engine registered in both places, or that the multiprocess files also hold, is not doubled.

Families from the engine's sources get Dynamo's automatic labels (``dynamo_namespace``,
``dynamo_component``, ``dynamo_endpoint``, ``worker_id``, ``model``, ``model_name``) at
scrape time, as 1.6.1's ``register_engine_registry`` does; a label the engine set itself
wins. Called once by the worker; collection happens on every scrape.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["EngineMetricsCollector", "scrape_registry"]

log = logging.getLogger(__name__)


class EngineMetricsCollector(Collector):
    """Families of ``sources`` not already in ``own``, with ``labels`` added (see module)."""

    def __init__(
        self,
        own: CollectorRegistry,
        sources: Iterable[CollectorRegistry],
        labels: Mapping[str, str],
    ) -> None:
        self._own = own
        self._sources = list(sources)
        self._labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        seen = {family.name for family in self._own.collect()}
        for source in self._sources:
            try:
                families = list(source.collect())
            except Exception:  # noqa: BLE001 - a broken engine collector must not break /metrics
                log.warning("collecting engine metrics failed", exc_info=True)
                continue
            for family in families:
                if family.name in seen:
                    continue
                seen.add(family.name)
                yield self._labelled(family)

    def _labelled(self, family: Metric) -> Metric:
        out = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            labels = {**self._labels, **sample.labels}
            out.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
        return out


def _multiprocess_registry(path: str | None) -> CollectorRegistry | None:
    if not path:
        return None
    if not os.path.isdir(path):
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR=%s is not a directory; serving single-process metrics",
            path,
        )
        return None
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def scrape_registry(
    own: CollectorRegistry,
    labels: Mapping[str, str],
    *,
    multiproc_dir: str | None = None,
    global_registry: CollectorRegistry = REGISTRY,
) -> CollectorRegistry:
    """The registry ``/metrics`` renders: ``own`` plus the engine's sources (see module).

    ``multiproc_dir`` is ``PROMETHEUS_MULTIPROC_DIR`` (``WorkerConfig.prometheus_multiproc_dir``).
    """
    sources = [r for r in (_multiprocess_registry(multiproc_dir), global_registry) if r]
    combined = CollectorRegistry(auto_describe=False)
    combined.register(_Passthrough(own))
    combined.register(EngineMetricsCollector(own, sources, labels))
    return combined


class _Passthrough(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        return iter(list(self._registry.collect()))
