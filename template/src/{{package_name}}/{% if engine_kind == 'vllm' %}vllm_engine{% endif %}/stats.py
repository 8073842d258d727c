"""vLLM's scheduler stats, per data-parallel rank: what feeds the ``dynamo_component_*`` gauges.

``RankStats`` holds the latest ``SchedulerStats`` of every rank. vLLM calls the
``StatsRecorder`` that ``recorder_factory(stats)`` builds once per engine step and rank
(``record``), on the event loop of the ``AsyncLLM`` that owns it; ``RankStats.on_update``
(if set) is called right after with the rank, so the engine pushes a snapshot only when
something changed. Readers (the engine, tests) read ``RankStats.latest`` at any time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase

__all__ = ["RankSnapshot", "RankStats", "recorder_factory"]


@dataclass(frozen=True)
class RankSnapshot:
    """One rank's scheduler state after an engine step."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


@dataclass
class RankStats:
    """The latest ``RankSnapshot`` per rank; ``on_update(rank)`` after each change."""

    latest: dict[int, RankSnapshot] = field(default_factory=dict)
    on_update: Callable[[int], None] | None = None

    def update(self, rank: int, snapshot: RankSnapshot) -> None:
        if self.latest.get(rank) == snapshot:
            return
        self.latest[rank] = snapshot
        if self.on_update is not None:
            self.on_update(rank)


class StatsRecorder(StatLoggerBase):
    """A vLLM stat logger that only copies the scheduler stats into ``RankStats``."""

    def __init__(self, stats: RankStats, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self._stats = stats
        self._rank = engine_index

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        self._stats.update(
            engine_idx,
            RankSnapshot(
                running=scheduler_stats.num_running_reqs,
                waiting=scheduler_stats.num_waiting_reqs,
                kv_usage=float(scheduler_stats.kv_cache_usage),
            ),
        )

    def log_engine_initialized(self) -> None:
        return None


def recorder_factory(stats: RankStats) -> Callable[[VllmConfig, int], StatsRecorder]:
    """The per-engine stat logger factory ``AsyncLLM(stat_loggers=[...])`` takes."""

    def build(vllm_config: VllmConfig, engine_index: int = 0) -> StatsRecorder:
        return StatsRecorder(stats, vllm_config, engine_index)

    return build
