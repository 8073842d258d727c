"""What an engine uses to feed Dynamo's KV-aware router: descriptors, publishers, hashing.

The engine's side: docs/contract.md#kv-events-and-snapshots; the bytes on the wire:
docs/wire-protocol.md#kv-events. This module is the engine-facing half only: the source
descriptors an engine returns, the snapshot value it publishes, the router's block hashing,
and the two publisher interfaces (typing Protocols) an engine calls. The worker implements
them in ``runtime.kv_events`` (the event plane on NATS or ZMQ, the relay of an engine's own
ZMQ socket); engine code never imports that.

An engine that wants ``--router-mode kv`` to send repeated prefixes back to it returns one
``PushSource`` per data-parallel rank from ``kv_event_sources()``::

    async def kv_event_sources(self):
        return [PushSource(self._on_publisher, dp_rank=0)]

    def _on_publisher(self, publisher: KvEventPublisher) -> None:
        self.kv_publisher = publisher     # keep it; call it whenever blocks change

    # later, when full blocks enter the cache (tokens of those blocks, in order):
    self.kv_publisher.publish_stored(token_ids, [block_size] * n, block_hashes, parent_hash)
    # and when they leave it:
    self.kv_publisher.publish_removed(block_hashes)

An engine that publishes its events on its own ZMQ socket, as vLLM and SGLang do, returns a
``ZmqSource`` instead; the worker subscribes to it and republishes.

Per-rank cache snapshots (the ``dynamo_component_*`` gauges and the router's load signal):
an engine declares its ranks in ``component_metrics_dp_ranks()``, keeps the
``SnapshotPublisher`` handed to ``attach_snapshot_publisher`` and calls, from any thread::

    self.snapshots.publish(0, ComponentSnapshot(kv_used_blocks=12, kv_total_blocks=1000,
                                                gpu_cache_usage=0.012, dp_rank=0,
                                                kv_cache_hit_rate=0.5))

How the router matches (verified against the 1.6.1 frontend and Dynamo's own mocker): for
each *full* block of the request's tokens it computes
``tokens_hash = xxh3_64(u32-LE token bytes, seed=1337)`` (``local_block_hash``) and walks its
tree from the root by these values. Each published block therefore carries the
``tokens_hash`` of its tokens (computed by the worker from ``token_ids``) and an
engine-chosen ``block_hash`` that identifies the block in later ``removed`` events and as
``parent_hash`` of the next stored run. ``sequence_block_hashes`` gives Dynamo's own chained
ids (first block: its tokens hash; then ``xxh3_64(u64-LE parent, u64-LE tokens_hash,
seed=1337)``), which engines may use as their ``block_hash``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

try:
    import xxhash
except ImportError:  # a runtime dependency; guarded so the worker imports without it
    xxhash = None  # type: ignore[assignment]

from .errors import invalid_arg
from .types import U64_MAX

__all__ = [
    "KV_HASH_SEED",
    "ComponentSnapshot",
    "KvEventPublisher",
    "PushSource",
    "SnapshotPublisher",
    "ZmqSource",
    "block_hash",
    "sequence_block_hashes",
    "tokens_hash",
]

KV_HASH_SEED = 1337


# -- hashing (what the router computes from request tokens) ----------------------------
def tokens_hash(tokens: Sequence[int], lora_name: str | None = None) -> int:
    """The router's ``local_block_hash`` of one block: xxh3-64 (seed 1337) of u32-LE ids.

    A non-empty ``lora_name`` seeds the hash with ``1337 + xxh3_64(name)`` (mod 2**64), as
    1.6.1's ``compute_block_hash_for_seq`` does, so adapters never share blocks.
    """
    if xxhash is None:
        raise RuntimeError("KV block hashing needs the 'xxhash' package (pip install xxhash)")
    data = struct.pack(f"<{len(tokens)}I", *(t & 0xFFFFFFFF for t in tokens))
    seed = KV_HASH_SEED
    if lora_name:
        seed = (seed + xxhash.xxh3_64_intdigest(lora_name.encode())) & U64_MAX
    return xxhash.xxh3_64_intdigest(data, seed=seed)


def _chain(parent: int, local: int) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, local), seed=KV_HASH_SEED)


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """Dynamo's id of a full block: its tokens hash, chained to ``parent`` (the previous id)."""
    local = tokens_hash(tokens)
    return local if parent is None else _chain(parent, local)


def sequence_block_hashes(
    token_ids: Sequence[int], block_size: int, parent: int | None = None
) -> list[int]:
    """Dynamo's chained block ids for the full blocks of ``token_ids`` (partial tail ignored)."""
    if block_size <= 0:
        raise invalid_arg("block_size must be positive")
    out: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        out.append(parent)
    return out


# -- what an engine calls (implemented by the worker) ------------------------------------
@runtime_checkable
class KvEventPublisher(Protocol):
    """One rank's block stored/removed events, handed to ``PushSource.on_ready`` once.

    ``publish_*`` may be called from any thread; events keep their order per publisher. They
    never block and never raise for transport problems: with the event plane down, events are
    lost (as in Dynamo) and a warning is logged once. They raise ``DynamoError``
    (InvalidArgument) for arguments that contradict each other.
    """

    @property
    def dp_rank(self) -> int: ...

    @property
    def block_size(self) -> int: ...

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
        """Full blocks entered the cache: their tokens (concatenated), sizes and ids, in order.

        ``parent_hash`` is the ``block_hash`` of the block before the first one (None at the
        start of a sequence). Sizes must match ``token_ids``; a block shorter than the KV block
        size cannot be matched by the router and is rejected. ``lora_name`` is the adapter the
        blocks were computed with; ``storage_tier`` is Dynamo's tier name (``device``,
        ``host_pinned``, ``disk``, ``external``).
        """
        ...

    def publish_removed(self, block_hashes: Sequence[int], *, storage_tier: str = "device") -> None:
        """Blocks left the cache (evicted or freed without caching)."""
        ...

    def publish_cleared(self) -> None:
        """Every block of this rank is gone (cache reset)."""
        ...


@dataclass
class ComponentSnapshot:
    """One rank's KV cache state. ``kv_cache_hit_rate`` is tri-state (None = no data)."""

    kv_used_blocks: int
    kv_total_blocks: int
    gpu_cache_usage: float
    dp_rank: int
    kv_cache_hit_rate: float | None = None


class SnapshotPublisher(Protocol):
    """Per-rank cache snapshots, handed to ``attach_snapshot_publisher`` once. Thread-safe.

    ``publish(dp_rank, snapshot)`` sets, for that rank, ``dynamo_component_total_blocks``
    (``kv_total_blocks``), ``dynamo_component_gpu_cache_usage_percent`` (``gpu_cache_usage``,
    a fraction 0..1) and, only when it is not None, ``dynamo_component_kv_cache_hit_rate``
    (0.0 is a real value); the first two are seeded 0 for every declared rank. It sends
    ``kv_used_blocks`` to the KV router when the event plane is up and the rank was declared.
    Never raises on I/O.
    """

    def publish(self, dp_rank: int, snapshot: ComponentSnapshot) -> None: ...


# -- source descriptors (returned by LLMEngine.kv_event_sources) ------------------------
@dataclass(frozen=True)
class PushSource:
    """The engine pushes events itself: ``on_ready(publisher)`` hands it a ``KvEventPublisher``.

    ``on_ready`` is called exactly once, by the worker, after ``kv_event_sources()`` returned
    and before the worker registers (so no request arrives first).
    """

    on_ready: Callable[[KvEventPublisher], None]
    dp_rank: int = 0


@dataclass(frozen=True)
class ZmqSource:
    """An engine-owned ZMQ PUB socket of KV events in vLLM's (or SGLang's) format.

    ``endpoint`` is what the worker's SUB socket connects to, ``topic`` its subscription
    prefix. The worker decodes every batch and republishes it for rank ``dp_rank`` with the
    router's hashing (``runtime.kv_events.relay``).
    """

    endpoint: str
    topic: str = ""
    dp_rank: int = 0
