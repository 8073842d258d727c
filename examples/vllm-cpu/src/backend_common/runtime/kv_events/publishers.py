"""The worker's implementations of the publishers an engine calls (``backend_common.kv_events``).

docs/contract.md#kv-events-and-snapshots. Made by the event plane (``PlaneKvEventPublisher``,
``LoadPublisher``) and by ``routing.setup_kv_routing`` (``GaugeSnapshotPublisher``); each
turns an engine's call into an event of its own ``Channel``, handed to the plane's ``submit``
(any thread, never blocking), or into gauge updates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from ...errors import invalid_arg
from ...kv_events import ComponentSnapshot, tokens_hash
from ...types import U64_MAX
from .channel import Channel, Submit

__all__ = ["GaugeSnapshotPublisher", "LoadPublisher", "PlaneKvEventPublisher"]

log = logging.getLogger(__name__)

PREFIX = "dynamo_component_"


class PlaneKvEventPublisher:
    """``kv_events.KvEventPublisher`` for one rank: stored/removed/cleared events, in order."""

    def __init__(self, channel: Channel, submit: Submit, dp_rank: int, block_size: int) -> None:
        self.channel = channel
        self._submit = submit
        self.dp_rank = dp_rank
        self.block_size = block_size
        self._event_id = 0
        self._lock = threading.Lock()

    @property
    def publisher_id(self) -> int:
        return self.channel.publisher_id

    def _emit(self, data: dict[str, Any] | str, storage_tier: str = "device") -> None:
        with self._lock:
            self._event_id += 1
            event_id = self._event_id
        self._submit(
            self.channel, data, event_id=event_id, dp_rank=self.dp_rank, storage_tier=storage_tier
        )

    def publish_stored(
        self,
        token_ids: Sequence[int],
        num_block_tokens: Sequence[int],
        block_hashes: Sequence[int],
        parent_hash: int | None = None,
        *,
        lora_name: str | None = None,
        storage_tier: str = "device",
    ) -> None:
        """See ``kv_events.KvEventPublisher.publish_stored``."""
        if len(num_block_tokens) != len(block_hashes):
            raise invalid_arg("num_block_tokens and block_hashes must have the same length")
        if sum(num_block_tokens) != len(token_ids):
            raise invalid_arg("sum(num_block_tokens) must equal len(token_ids)")
        blocks = []
        start = 0
        for size, block_hash in zip(num_block_tokens, block_hashes, strict=True):
            if size != self.block_size:
                raise invalid_arg(f"stored blocks must hold {self.block_size} tokens, got {size}")
            blocks.append(
                {
                    "block_hash": int(block_hash) & U64_MAX,
                    "tokens_hash": tokens_hash(token_ids[start : start + size], lora_name),
                    "mm_extra_info": None,
                }
            )
            start += size
        if not blocks:
            return
        parent = None if parent_hash is None else int(parent_hash) & U64_MAX
        stored = {"parent_hash": parent, "start_position": None, "blocks": blocks}
        self._emit({"stored": stored}, storage_tier)

    def publish_removed(self, block_hashes: Sequence[int], *, storage_tier: str = "device") -> None:
        """See ``kv_events.KvEventPublisher.publish_removed``."""
        hashes = [int(h) & U64_MAX for h in block_hashes]
        if hashes:
            self._emit({"removed": {"block_hashes": hashes}}, storage_tier)

    def publish_cleared(self) -> None:
        """See ``kv_events.KvEventPublisher.publish_cleared``."""
        self._emit("cleared")


class LoadPublisher:
    """The router's per-rank load signal (``kv_metrics``): ``kv_used_blocks``, sent on change."""

    def __init__(self, channel: Channel, submit: Submit) -> None:
        self.channel = channel
        self._submit = submit
        self._last: dict[int, int] = {}

    @property
    def publisher_id(self) -> int:
        return self.channel.publisher_id

    def publish(self, dp_rank: int, kv_used_blocks: int) -> None:
        value = max(0, int(kv_used_blocks))
        if self._last.get(dp_rank) == value:
            return
        self._last[dp_rank] = value
        self._submit(self.channel, value, dp_rank=dp_rank)


class GaugeSnapshotPublisher:
    """``kv_events.SnapshotPublisher``: per-rank gauges, ``kv_used_blocks`` to the router.

    Thread-safe. The gauges get the worker's metric labels plus ``dp_rank``; ``load`` is None
    when no event plane is up (then only the gauges move).
    """

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
        """See ``kv_events.SnapshotPublisher.publish``."""
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
