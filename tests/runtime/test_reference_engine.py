"""The reference engine's benchmark-relevant behaviour: one suspension per token, and with
``--publish-kv-events`` the stored/removed events and load snapshots Dynamo's sample engine
publishes (one stored event of ``max(1, prompt // 16)`` blocks per request, removed at its end)."""

from __future__ import annotations

import asyncio

from backend_common import GenerateContext, PreprocessedRequest
from backend_common.reference import ReferenceEngine
from backend_common.testing import collect


class _Publisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def publish_stored(self, token_ids, num_block_tokens, block_hashes, parent_hash=None):
        assert len(token_ids) == sum(num_block_tokens) == 16 * len(block_hashes)
        self.events.append(("stored", list(block_hashes)))

    def publish_removed(self, block_hashes):
        self.events.append(("removed", list(block_hashes)))


class _Snapshots:
    def __init__(self) -> None:
        self.used: list[int] = []

    def publish(self, dp_rank, snapshot) -> None:
        assert dp_rank == 0
        self.used.append(snapshot.kv_used_blocks)


def _request(prompt: int, max_tokens: int) -> PreprocessedRequest:
    return PreprocessedRequest(
        model="m", token_ids=list(range(prompt)), stop_conditions={"max_tokens": max_tokens}
    )


async def test_kv_events_off_by_default() -> None:
    engine = ReferenceEngine()
    assert await engine.kv_event_sources() == [] and engine.component_metrics_dp_ranks() == []


async def test_publishes_stored_then_removed_blocks_and_snapshots() -> None:
    engine = ReferenceEngine(publish_kv_events=True)
    await engine.start(0)
    (source,) = await engine.kv_event_sources()
    publisher, snapshots = _Publisher(), _Snapshots()
    source.on_ready(publisher)
    assert engine.component_metrics_dp_ranks() == [0]
    engine.attach_snapshot_publisher(snapshots)
    try:
        items = await collect(engine, _request(40, 3))
        assert [i.token_ids for i in items] == [[1], [2], [3]]
        await collect(engine, _request(5, 1))
        (k1, stored1), (k2, removed1), (k3, stored2), (k4, removed2) = publisher.events
        assert (k1, k2, k3, k4) == ("stored", "removed", "stored", "removed")
        assert len(stored1) == 2 and removed1 == stored1  # 40 // 16 blocks
        assert len(stored2) == 1 and removed2 == stored2 and set(stored1).isdisjoint(stored2)
        assert engine.kv_used_blocks == 0
        await asyncio.sleep(0)
        assert snapshots.used  # the 10 Hz snapshot task reports the cache usage
    finally:
        await engine.cleanup()


async def test_one_suspension_per_token_even_without_delay() -> None:
    """Another task gets a turn between any two tokens (as with Dynamo's sample engine)."""
    engine = ReferenceEngine()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        seen = []
        async for _item in engine.generate(_request(4, 20), GenerateContext()):
            seen.append(ticks)
        assert len(seen) == 20
        assert all(b > a for a, b in zip(seen, seen[1:], strict=False))
    finally:
        task.cancel()
