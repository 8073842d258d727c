"""What a running worker exposes on ``/metrics`` (contract.md section 9), read by scraping.

* lifecycle gauges: ``model_load_time_seconds`` (set after ``start``), ``drain_time_seconds``
  and ``cleanup_time_seconds`` (0 until shutdown, then set);
* per-rank gauges from the engine's ``SnapshotPublisher``: ``total_blocks`` and
  ``gpu_cache_usage_percent`` seeded 0 for every declared rank, ``kv_cache_hit_rate`` only
  once a rank reported one (tri-state), all labelled ``dp_rank``;
* the engine's own metrics from ``setup_metrics`` on the same page.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from inproc_worker import file_config, running_worker
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from backend_common.kv_events import ComponentSnapshot, SnapshotPublisher
from backend_common.reference import ReferenceEngine

PHASE_S = 0.05


class RankedEngine(ReferenceEngine):
    """Declares two DP ranks, reports one snapshot for rank 0, and has a metric of its own."""

    def __init__(self) -> None:
        super().__init__("metrics-model")
        self.publisher: SnapshotPublisher | None = None
        self.counter: Counter | None = None

    async def start(self, worker_id: int):
        await asyncio.sleep(PHASE_S)  # a measurable "model load"
        return await super().start(worker_id)

    async def setup_metrics(self, registry: CollectorRegistry) -> None:
        self.counter = Counter("myengine_steps", "Engine steps run.", registry=registry)
        self.counter.inc(3)

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0, 1]

    def attach_snapshot_publisher(self, publisher: SnapshotPublisher) -> None:
        self.publisher = publisher

    async def drain(self) -> None:
        await asyncio.sleep(PHASE_S)

    async def cleanup(self) -> None:
        await asyncio.sleep(PHASE_S)
        await super().cleanup()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def find(metrics: dict, name: str, **labels: str) -> list[float]:
    return [
        value
        for (n, lbls), value in metrics.items()
        if n == name and all((k, v) in lbls for k, v in labels.items())
    ]


async def scrape(base: str) -> dict[Any, float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            assert resp.status == 200
            return samples(await resp.text())


async def test_lifecycle_rank_and_engine_metrics_on_one_page(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("NATS_SERVER", raising=False)
    engine = RankedEngine()
    async with running_worker(engine, file_config(tmp_path)) as (worker, base):
        m = await scrape(base)
        (load,) = find(m, "dynamo_component_model_load_time_seconds", model="metrics-model")
        assert load >= PHASE_S
        assert find(m, "dynamo_component_drain_time_seconds") == [0.0]
        assert find(m, "dynamo_component_cleanup_time_seconds") == [0.0]
        # Seeded per declared rank; no hit rate before a rank reports one.
        for rank in ("0", "1"):
            assert find(m, "dynamo_component_total_blocks", dp_rank=rank) == [0.0]
            assert find(m, "dynamo_component_gpu_cache_usage_percent", dp_rank=rank) == [0.0]
        assert find(m, "dynamo_component_kv_cache_hit_rate") == []
        assert find(m, "myengine_steps_total") == [3.0]

        assert engine.publisher is not None
        engine.publisher.publish(
            0,
            ComponentSnapshot(
                kv_used_blocks=25,
                kv_total_blocks=100,
                gpu_cache_usage=0.25,
                dp_rank=0,
                kv_cache_hit_rate=0.0,  # a real measurement: written
            ),
        )
        engine.publisher.publish(
            1, ComponentSnapshot(kv_used_blocks=1, kv_total_blocks=50, gpu_cache_usage=0, dp_rank=1)
        )
        m = await scrape(base)
        assert find(m, "dynamo_component_total_blocks", dp_rank="0", model="metrics-model") == [
            100.0
        ]
        assert find(m, "dynamo_component_gpu_cache_usage_percent", dp_rank="0") == [0.25]
        assert find(m, "dynamo_component_kv_cache_hit_rate", dp_rank="0") == [0.0]
        assert find(m, "dynamo_component_total_blocks", dp_rank="1") == [50.0]
        assert find(m, "dynamo_component_kv_cache_hit_rate", dp_rank="1") == []
        assert worker.metrics is not None
    # After shutdown the drain and cleanup gauges hold the measured times.
    m = samples(worker.metrics.render().decode())
    (drain,) = find(m, "dynamo_component_drain_time_seconds")
    (cleanup,) = find(m, "dynamo_component_cleanup_time_seconds")
    assert drain >= PHASE_S and cleanup >= PHASE_S


async def test_no_rank_gauges_without_kv_routing(monkeypatch, tmp_path) -> None:
    engine = RankedEngine()
    config = file_config(tmp_path, enable_kv_routing=False)
    async with running_worker(engine, config) as (_worker, base):
        m = await scrape(base)
    assert find(m, "dynamo_component_total_blocks") == []
    assert engine.publisher is None
    assert find(m, "dynamo_component_model_load_time_seconds")
