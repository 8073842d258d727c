"""The worker's event plane: channels, their envelopes, one sender task, a pluggable transport.

Wire format: docs/wire-protocol.md#kv-events. Built by ``routing.setup_kv_routing`` when KV
routing is on, with the transport the configuration names (``transports.NatsTransport`` or
``transports.ZmqTransport``, 1.6.1's default); the plane itself knows nothing of either.

Contract and invariants:

* A ``Channel`` is one stream of envelopes (a topic and a random publisher id) with a
  gap-free ``sequence``; publishers (``publishers.py``) own one each and hand their events to
  ``EventPlane.submit`` from any thread. ``submit`` never blocks: events reach the loop with
  ``call_soon_threadsafe`` and wait in one queue (at most ``MAX_PENDING``; beyond that they
  are dropped with one warning).
* One sender task builds each event's payload (with the current ``worker_id``, which changes
  after a lease change), wraps it into its channel's envelope and hands the bytes to the
  transport. Events keep their order per channel. A transport failure (NATS down, a full
  ZMQ queue) loses the event and logs one warning, as in Dynamo; the plane never raises for
  it.
* ``records(worker_id)`` (called by the worker before it registers and after every lease
  change) returns the discovery records of every channel; the transport describes where a
  channel's events travel and may open its socket then, so the address in the record is live.
* ``close()`` first awaits the feeders registered with ``on_close`` (the ZMQ relays), then
  flushes the queue (at most ``FLUSH_TIMEOUT_S``) and closes the transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .channel import Channel, EventDropped
from .publishers import LoadPublisher, PlaneKvEventPublisher
from .records import (
    KV_EVENTS_TOPIC,
    KV_METRICS_TOPIC,
    event_channel_record,
    event_source_record,
    subject_prefix,
)

__all__ = ["MAX_PENDING", "EventPlane", "EventTransport"]

log = logging.getLogger(__name__)

# Events queued while the transport is slow; beyond this they are dropped (with one warning).
MAX_PENDING = 65536
FLUSH_TIMEOUT_S = 2.0


class EventTransport(Protocol):
    """Where a plane's envelopes go; one small object per kind (``transports.py``).

    Used from the event loop only: ``describe`` by ``EventPlane.records``, ``send`` by the
    sender task, ``close`` once by ``EventPlane.close``.
    """

    def describe(self, channel: Channel) -> dict[str, Any]:
        """The ``transport`` of ``channel``'s EventChannel record (may open its socket)."""
        ...

    async def send(self, channel: Channel, sequence: int, envelope: bytes) -> None:
        """Send one envelope; raise (``EventDropped`` or any error) when it is lost."""
        ...

    async def close(self) -> None: ...


class EventPlane:
    """Publishers' channels, their discovery records and one sender task. See the module doc."""

    def __init__(self, transport: EventTransport, ns: str, comp: str, ep: str, worker_id: int):
        self.transport = transport
        self.ns, self.comp, self.ep = ns, comp, ep
        self.prefix = subject_prefix(ns, comp, ep)
        self.worker_id = worker_id
        self.kv_publishers: list[PlaneKvEventPublisher] = []
        self.load = LoadPublisher(self.channel(KV_METRICS_TOPIC), self.submit)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[Channel, Any, dict[str, Any]] | None] = asyncio.Queue()
        self._sender = self._loop.create_task(self._send_loop())
        self._warned = False
        # Stopped first by close(), before the last events are flushed (ZMQ source relays).
        self._on_close: list[Callable[[], Awaitable[None]]] = []

    def channel(self, topic: str) -> Channel:
        """A new channel of ``topic`` on this plane (one per publisher)."""
        return Channel(self.prefix, topic)

    def kv_publisher(self, dp_rank: int, block_size: int) -> PlaneKvEventPublisher:
        """A new publisher of rank ``dp_rank``'s block events, announced in ``records``."""
        pub = PlaneKvEventPublisher(self.channel(KV_EVENTS_TOPIC), self.submit, dp_rank, block_size)
        self.kv_publishers.append(pub)
        return pub

    def records(self, worker_id: int) -> list[tuple[str, dict[str, Any]]]:
        """Every channel's discovery records, for ``worker_id`` (kept for later payloads)."""
        self.worker_id = worker_id
        ns, comp, ep = self.ns, self.comp, self.ep
        load = self.load.channel
        out = [
            event_channel_record(
                ns, comp, ep, KV_METRICS_TOPIC, load.publisher_id, self.transport.describe(load)
            )
        ]
        for pub in self.kv_publishers:
            channel = pub.channel
            out.append(
                event_channel_record(
                    ns,
                    comp,
                    ep,
                    KV_EVENTS_TOPIC,
                    channel.publisher_id,
                    self.transport.describe(channel),
                )
            )
            out.append(
                event_source_record(ns, comp, ep, channel.publisher_id, worker_id, pub.dp_rank)
            )
        return out

    def on_close(self, stop: Callable[[], Awaitable[None]]) -> None:
        """Have ``close()`` await ``stop()`` first (a feeder of this plane's publishers)."""
        self._on_close.append(stop)

    # -- sending -----------------------------------------------------------------------
    def submit(self, channel: Channel, data: Any, **extra: Any) -> None:
        """Queue one event of ``channel`` (from any thread; never blocks, never raises)."""
        item = (channel, data, extra)
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._enqueue(item)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._enqueue, item)

    def _enqueue(self, item: tuple[Channel, Any, dict[str, Any]]) -> None:
        if self._queue.qsize() >= MAX_PENDING:
            self._warn("event queue full; dropping KV events")
            return
        self._queue.put_nowait(item)

    def _payload(self, channel: Channel, data: Any, extra: dict[str, Any]) -> Any:
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
                sequence, envelope = channel.envelope(self._payload(channel, data, extra))
                await self.transport.send(channel, sequence, envelope)
            except EventDropped as exc:
                self._warn(str(exc))
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
            await asyncio.wait_for(self._sender, FLUSH_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
            self._sender.cancel()
        await self.transport.close()
