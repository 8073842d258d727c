"""The event plane's two transports: NATS subjects and 1.6.1's ZMQ PUB sockets.

docs/wire-protocol.md#the-zmq-event-plane. Each is one small object the ``EventPlane`` is
built with (``plane.EventTransport``): ``describe`` gives a channel's ``transport`` entry of
its EventChannel record, ``send`` carries one envelope, ``close`` ends it. Both are used from
the event loop only.

NATS (``--event-plane nats``): the envelope is published on ``{subject_prefix}.{topic}``; the
record carries ``{"kind": "Nats", "config": {"subject_prefix": ...}}``.

ZMQ (1.6.1's default when ``--event-plane`` is not given), as observed from a real 1.6.1
worker and its frontend:

* every channel (one ``topic`` + ``publisher_id``: ``kv-events`` per data-parallel rank,
  ``kv_metrics`` once) has its own ZMQ PUB socket; its record carries
  ``{"kind": "Zmq", "config": {"endpoint": "tcp://<host>:<port>"}}``, and the frontend's SUB
  socket connects to that endpoint when the record appears;
* each event is one multipart message of four frames:
  ``[topic (utf-8), publisher_id (u64 big-endian), sequence (u64 big-endian), frame]``,
  ``frame = version (1 byte, = 1) + length (u32 big-endian) + envelope`` and the envelope is
  the NATS plane's msgpack ``{publisher_id, sequence, published_at, topic, payload}``;
* ``<host>`` is ``DYN_EVENT_PLANE_HOST``. 1.6.1 binds ``0.0.0.0`` and only advertises that
  host; this transport binds exactly the advertised host (``WorkerConfig.event_plane_host``,
  default 127.0.0.1), so a worker never listens on more interfaces than it announces.

A channel's socket is opened by ``describe`` (called by ``EventPlane.records`` before the
worker registers, so the endpoint in the record is live). pyzmq sockets are not thread-safe;
they are only used from the event loop's sender task. Sends never block: past the high-water
mark a message is dropped with one warning, as for NATS outages; a subscriber that joins late
misses what was sent before (ZMQ PUB/SUB).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import zmq

from .channel import Channel, EventDropped

__all__ = ["FRAME_VERSION", "NatsTransport", "ZmqTransport", "encode_frames"]

log = logging.getLogger(__name__)

FRAME_VERSION = 1
SNDHWM = 100_000  # as 1.6.1's ZMQ_SNDHWM
LINGER_MS = 200  # how long close() lets queued messages leave
NATS_DRAIN_S = 2.0


def encode_frames(topic: str, publisher_id: int, sequence: int, envelope: bytes) -> list[bytes]:
    """The four frames 1.6.1 sends for one msgpack ``envelope`` (see the module doc)."""
    return [
        topic.encode(),
        publisher_id.to_bytes(8, "big"),
        sequence.to_bytes(8, "big"),
        struct.pack(">BI", FRAME_VERSION, len(envelope)) + envelope,
    ]


class NatsTransport:
    """Envelopes on NATS subjects, over the connection ``nc`` (owned: drained by ``close``)."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc

    @classmethod
    async def connect(cls, servers: str) -> NatsTransport:
        import nats

        return cls(await nats.connect(servers=servers.split(","), name="backend_common-events"))

    def describe(self, channel: Channel) -> dict[str, Any]:
        return {"kind": "Nats", "config": {"subject_prefix": channel.prefix}}

    async def send(self, channel: Channel, sequence: int, envelope: bytes) -> None:
        await self._nc.publish(channel.subject, envelope)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._nc.drain(), NATS_DRAIN_S)
        except Exception:  # noqa: BLE001
            await self._nc.close()


class ZmqTransport:
    """Envelopes on one ZMQ PUB socket per channel, bound to ``host`` (see the module doc)."""

    def __init__(self, host: str, ctx: zmq.Context | None = None) -> None:
        self._ctx = ctx or zmq.Context()
        self.host = host
        self._sockets: dict[int, tuple[zmq.Socket, str]] = {}  # publisher_id -> (socket, url)

    def endpoint(self, channel: Channel) -> str:
        """The advertised ``tcp://host:port`` of ``channel`` (binds its socket on first use)."""
        entry = self._sockets.get(channel.publisher_id)
        if entry is None:
            sock = self._ctx.socket(zmq.PUB)
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
            sock.setsockopt(zmq.LINGER, LINGER_MS)
            host = f"[{self.host}]" if ":" in self.host else self.host
            if ":" in self.host:
                sock.setsockopt(zmq.IPV6, 1)
            port = sock.bind_to_random_port(f"tcp://{host}")
            entry = self._sockets[channel.publisher_id] = (sock, f"tcp://{host}:{port}")
            log.debug("ZMQ event channel %s on %s", channel.topic, entry[1])
        return entry[1]

    def describe(self, channel: Channel) -> dict[str, Any]:
        return {"kind": "Zmq", "config": {"endpoint": self.endpoint(channel)}}

    async def send(self, channel: Channel, sequence: int, envelope: bytes) -> None:
        self.endpoint(channel)
        sock = self._sockets[channel.publisher_id][0]
        frames = encode_frames(channel.topic, channel.publisher_id, sequence, envelope)
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise EventDropped("ZMQ event plane: send queue full, dropping KV events") from None

    async def close(self) -> None:
        for sock, _url in self._sockets.values():
            sock.close(linger=LINGER_MS)
        self._sockets.clear()
        # term() waits for the lingering messages; keep that wait off the event loop.
        await asyncio.to_thread(self._ctx.term)
