"""KV cache events for Dynamo's KV-aware router, on the NATS or the ZMQ event plane.

Wire format: docs/wire-protocol.md#kv-events; the engine's side:
docs/contract.md#kv-events-and-snapshots.

The ZMQ event plane (1.6.1's default) is ``zmq_event_plane``; an engine that publishes
its events on its own ZMQ socket, as vLLM and SGLang do, returns a ``ZmqSource`` instead
of a ``PushSource`` (see ``runtime.zmq_source``).

An engine that wants ``--router-mode kv`` to send repeated prefixes back to it
returns one ``PushSource`` per data-parallel rank from ``kv_event_sources()``::

    async def kv_event_sources(self):
        return [PushSource(self._on_publisher, dp_rank=0)]

    def _on_publisher(self, publisher: KvEventPublisher) -> None:
        self.kv_publisher = publisher     # keep it; call it whenever blocks change

    # later, when full blocks enter the cache (tokens of those blocks, in order):
    self.kv_publisher.publish_stored(token_ids, [block_size] * n, block_hashes, parent_hash)
    # and when they leave it:
    self.kv_publisher.publish_removed(block_hashes)

``on_ready`` is called exactly once per source, by the worker, after
``kv_event_sources()`` returned and before the worker registers (so no request
arrives first). ``publish_*`` may be called from any thread; events keep their
order per publisher. They never block and never raise for transport problems:
with NATS down, events are lost (as in Dynamo) and a warning is logged once.

How the router matches (verified against the 1.6.1 frontend and Dynamo's own
mocker): for each *full* block of the request's tokens it computes
``tokens_hash = xxh3_64(u32-LE token bytes, seed=1337)`` (``local_block_hash``)
and walks its tree from the root by these values. Each published block
therefore carries the ``tokens_hash`` of its tokens (computed here from
``token_ids``) and an engine-chosen ``block_hash`` that identifies the block in
later ``removed`` events and as ``parent_hash`` of the next stored run.
``sequence_block_hashes`` gives Dynamo's own chained ids (first block: its
tokens hash; then ``xxh3_64(u64-LE parent, u64-LE tokens_hash, seed=1337)``),
which engines may use as their ``block_hash``.

Wire format (per publisher; the ZMQ plane sends the same envelope): NATS subject
``namespace.{ns}.component.{comp}.endpoint.{ep}.{topic}``; message = msgpack
envelope ``{publisher_id, sequence, published_at (ms), topic, payload: bytes}``;
``kv-events`` payload = ``[RouterEvent]`` with
``{worker_id, storage_tier: "device", residency_domain: "worker", event:
{event_id, data: {"stored": {...}} | {"removed": {...}}, dp_rank}}``;
``kv_metrics`` payload (the router's load signal, sent on change) =
``{worker_id, dp_rank, active_decode_blocks, active_prefill_tokens, kv_used_blocks}``.
Discovery records: one ``EventChannel`` per topic and publisher, and one
``EventSource`` per kv-events publisher, all bound to the worker's lease.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

try:
    import xxhash
except ImportError:  # a runtime dependency; guarded so the worker imports without it
    xxhash = None  # type: ignore[assignment]

from .errors import invalid_arg

__all__ = [
    "KV_EVENTS_TOPIC",
    "KV_HASH_SEED",
    "KV_METRICS_TOPIC",
    "EventPlane",
    "KvEventPublisher",
    "LoadPublisher",
    "PushSource",
    "block_hash",
    "ZmqSource",
    "event_channel_record",
    "event_source_record",
    "sequence_block_hashes",
    "subject_prefix",
    "tokens_hash",
]

log = logging.getLogger(__name__)

KV_HASH_SEED = 1337
KV_EVENTS_TOPIC = "kv-events"
KV_METRICS_TOPIC = "kv_metrics"
U64 = (1 << 64) - 1
# Events queued while NATS is slow; beyond this they are dropped (with one warning).
MAX_PENDING = 65536


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
        seed = (seed + xxhash.xxh3_64_intdigest(lora_name.encode())) & U64
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


# -- source descriptors (returned by LLMEngine.kv_event_sources) ------------------------
@dataclass(frozen=True)
class PushSource:
    """The engine pushes events itself: ``on_ready(publisher)`` hands it a ``KvEventPublisher``."""

    on_ready: Callable[[KvEventPublisher], None]
    dp_rank: int = 0


@dataclass(frozen=True)
class ZmqSource:
    """An engine-owned ZMQ PUB socket of KV events in vLLM's format (``runtime.zmq_source``)."""

    endpoint: str
    topic: str = ""
    dp_rank: int = 0


# -- discovery records -------------------------------------------------------------------
def subject_prefix(ns: str, comp: str, ep: str) -> str:
    return f"namespace.{ns}.component.{comp}.endpoint.{ep}"


def _scope(ns: str, comp: str, ep: str) -> dict[str, Any]:
    return {"kind": "endpoint", "endpoint": {"namespace": ns, "component": comp, "name": ep}}


def _key(bucket: str, ns: str, comp: str, ep: str, topic: str, publisher_id: int) -> str:
    return (
        f"v1/{bucket}/namespace/{ns}/component/{comp}/endpoint/{ep}/topic/{topic}/{publisher_id:x}"
    )


def event_channel_record(
    ns: str,
    comp: str,
    ep: str,
    topic: str,
    publisher_id: int,
    transport: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(key, EventChannel record)`` announcing a publisher of ``topic`` (default: on NATS)."""
    if transport is None:
        transport = {"kind": "Nats", "config": {"subject_prefix": subject_prefix(ns, comp, ep)}}
    value = {
        "type": "EventChannel",
        "scope": _scope(ns, comp, ep),
        "topic": topic,
        "instance_id": publisher_id,
        "transport": transport,
    }
    return _key("event_channels", ns, comp, ep, topic, publisher_id), value


def event_source_record(
    ns: str, comp: str, ep: str, publisher_id: int, worker_id: int, dp_rank: int
) -> tuple[str, dict[str, Any]]:
    """``(key, EventSource record)`` tying a kv-events publisher to its worker and rank."""
    value = {
        "type": "EventSource",
        "scope": _scope(ns, comp, ep),
        "topic": KV_EVENTS_TOPIC,
        "publisher_id": publisher_id,
        "metadata": {
            "kv_state_endpoint": {"namespace": ns, "component": comp, "name": ep},
            "worker": {"worker_id": worker_id, "dp_rank": dp_rank},
            "publisher_id": publisher_id,
        },
    }
    return _key("event_sources", ns, comp, ep, KV_EVENTS_TOPIC, publisher_id), value


def _new_publisher_id() -> int:
    # Dynamo's publisher ids stay below 2^53 (they travel in JSON).
    return random.getrandbits(52) | 1


# -- the NATS publishing machinery ---------------------------------------------------------
class _Channel:
    """One (topic, publisher_id) stream: envelopes with a gap-free ``sequence``."""

    def __init__(self, plane: EventPlane, topic: str) -> None:
        self.plane = plane
        self.topic = topic
        self.publisher_id = _new_publisher_id()
        self.subject = f"{plane.prefix}.{topic}"
        self._sequence = 0

    def envelope(self, payload: Any) -> bytes:
        body = {
            "publisher_id": self.publisher_id,
            "sequence": self._sequence,
            "published_at": int(time.time() * 1000),
            "topic": self.topic,
            "payload": msgpack.packb(payload, use_bin_type=True),
        }
        self._sequence += 1
        return msgpack.packb(body, use_bin_type=True)

    def send(self, payload: Any) -> None:
        self.plane._submit(self, payload)


class KvEventPublisher:
    """Publishes one rank's block stored/removed events. Made by the worker; see the module doc."""

    def __init__(self, plane: EventPlane, dp_rank: int, block_size: int) -> None:
        self._plane = plane
        self.dp_rank = dp_rank
        self.block_size = block_size
        self._channel = _Channel(plane, KV_EVENTS_TOPIC)
        self._event_id = 0
        self._lock = threading.Lock()

    @property
    def publisher_id(self) -> int:
        return self._channel.publisher_id

    def _emit(self, data: dict[str, Any] | str, storage_tier: str = "device") -> None:
        with self._lock:
            self._event_id += 1
            event_id = self._event_id
        self._plane._submit(
            self._channel, data, event_id=event_id, dp_rank=self.dp_rank, storage_tier=storage_tier
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
        """Full blocks entered the cache: their tokens (concatenated), sizes and ids, in order.

        ``parent_hash`` is the ``block_hash`` of the block before the first one (None at the
        start of a sequence). Sizes must match ``token_ids``; a block shorter than the KV block
        size cannot be matched by the router and is rejected. ``lora_name`` is the adapter the
        blocks were computed with; ``storage_tier`` is Dynamo's tier name (``device``,
        ``host_pinned``, ``disk``, ``external``).
        """
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
                    "block_hash": int(block_hash) & U64,
                    "tokens_hash": tokens_hash(token_ids[start : start + size], lora_name),
                    "mm_extra_info": None,
                }
            )
            start += size
        if not blocks:
            return
        parent = None if parent_hash is None else int(parent_hash) & U64
        stored = {"parent_hash": parent, "start_position": None, "blocks": blocks}
        self._emit({"stored": stored}, storage_tier)

    def publish_removed(self, block_hashes: Sequence[int], *, storage_tier: str = "device") -> None:
        """Blocks left the cache (evicted or freed without caching)."""
        hashes = [int(h) & U64 for h in block_hashes]
        if hashes:
            self._emit({"removed": {"block_hashes": hashes}}, storage_tier)

    def publish_cleared(self) -> None:
        """Every block of this rank is gone (cache reset)."""
        self._emit("cleared")


class LoadPublisher:
    """The router's per-rank load signal (``kv_metrics``): ``kv_used_blocks``, sent on change."""

    def __init__(self, plane: EventPlane) -> None:
        self._plane = plane
        self._channel = _Channel(plane, KV_METRICS_TOPIC)
        self._last: dict[int, int] = {}

    @property
    def publisher_id(self) -> int:
        return self._channel.publisher_id

    def publish(self, dp_rank: int, kv_used_blocks: int) -> None:
        value = max(0, int(kv_used_blocks))
        if self._last.get(dp_rank) == value:
            return
        self._last[dp_rank] = value
        self._plane._submit(self._channel, value, dp_rank=dp_rank)


class EventPlane:
    """The worker's NATS event plane: publishers, their discovery records and one sender task.

    Built by the worker (``await EventPlane.connect(...)``) when KV routing is on and the
    event plane is NATS. ``records()`` are registered with the worker's other records (and
    again after a lease change, with ``worker_id`` updated); ``close()`` flushes and stops.
    """

    def __init__(self, nc: Any, ns: str, comp: str, ep: str, worker_id: int) -> None:
        self._nc = nc
        self.ns, self.comp, self.ep = ns, comp, ep
        self.prefix = subject_prefix(ns, comp, ep)
        self.worker_id = worker_id
        self.kv_publishers: list[KvEventPublisher] = []
        self.load = LoadPublisher(self)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[_Channel, Any, dict[str, Any]] | None] = asyncio.Queue()
        self._sender = self._loop.create_task(self._send_loop())
        self._warned = False
        # Stopped first by close(), before the last events are flushed (ZMQ source relays).
        self._on_close: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    async def connect(cls, servers: str, ns: str, comp: str, ep: str, worker_id: int) -> EventPlane:
        import nats

        nc = await nats.connect(servers=servers.split(","), name="backend_common-events")
        return cls(nc, ns, comp, ep, worker_id)

    def kv_publisher(self, dp_rank: int, block_size: int) -> KvEventPublisher:
        pub = KvEventPublisher(self, dp_rank, block_size)
        self.kv_publishers.append(pub)
        return pub

    def records(self, worker_id: int) -> list[tuple[str, dict[str, Any]]]:
        self.worker_id = worker_id
        ns, comp, ep = self.ns, self.comp, self.ep
        load = self.load._channel
        out = [
            event_channel_record(
                ns, comp, ep, KV_METRICS_TOPIC, load.publisher_id, self._transport(load)
            )
        ]
        for pub in self.kv_publishers:
            channel = pub._channel
            out.append(
                event_channel_record(
                    ns, comp, ep, KV_EVENTS_TOPIC, pub.publisher_id, self._transport(channel)
                )
            )
            out.append(event_source_record(ns, comp, ep, pub.publisher_id, worker_id, pub.dp_rank))
        return out

    def on_close(self, stop: Callable[[], Awaitable[None]]) -> None:
        """Have ``close()`` await ``stop()`` first (a feeder of this plane's publishers)."""
        self._on_close.append(stop)

    # -- transport (overridden by the ZMQ event plane) ------------------------------------
    def _transport(self, channel: _Channel) -> dict[str, Any]:
        return {"kind": "Nats", "config": {"subject_prefix": self.prefix}}

    async def _publish(self, channel: _Channel, envelope: bytes) -> None:
        await self._nc.publish(channel.subject, envelope)

    async def _close_transport(self) -> None:
        try:
            await asyncio.wait_for(self._nc.drain(), 2.0)
        except Exception:  # noqa: BLE001
            await self._nc.close()

    # -- sending -----------------------------------------------------------------------
    def _submit(self, channel: _Channel, data: Any, **extra: Any) -> None:
        item = (channel, data, extra)
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._enqueue(item)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._enqueue, item)

    def _enqueue(self, item: tuple[_Channel, Any, dict[str, Any]]) -> None:
        if self._queue.qsize() >= MAX_PENDING:
            self._warn("event queue full; dropping KV events")
            return
        self._queue.put_nowait(item)

    def _payload(self, channel: _Channel, data: Any, extra: dict[str, Any]) -> Any:
        if channel.topic == KV_METRICS_TOPIC:
            return {
                "worker_id": self.worker_id,
                "dp_rank": extra.get("dp_rank", 0),
                "active_decode_blocks": None,
                "active_prefill_tokens": None,
                "kv_used_blocks": data,
            }
        event = {"event_id": extra["event_id"], "data": data, "dp_rank": extra.get("dp_rank", 0)}
        return [
            {
                "worker_id": self.worker_id,
                "storage_tier": extra.get("storage_tier", "device"),
                "residency_domain": "worker",
                "event": event,
            }
        ]

    async def _send_loop(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            channel, data, extra = item
            try:
                await self._publish(channel, channel.envelope(self._payload(channel, data, extra)))
            except Exception as exc:  # noqa: BLE001 - events are best effort, as in Dynamo
                self._warn(f"KV event publish failed ({exc!r}); suppressing further warnings")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(message)
        else:
            log.debug(message)

    async def close(self) -> None:
        for stop in self._on_close:
            try:
                await stop()
            except Exception:  # noqa: BLE001 - closing must reach the transport
                log.exception("stopping a KV event feeder failed")
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(self._sender, 2.0)
        except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
            self._sender.cancel()
        await self._close_transport()
