"""Dynamo 1.6.1's ZMQ event plane (its default when ``--event-plane`` is not given).

The same publishers, envelopes and discovery records as the NATS plane (``kv_events``);
only the transport differs. Observed from a real 1.6.1 worker and its frontend:

* every channel (one ``topic`` + ``publisher_id``: ``kv-events`` per data-parallel rank,
  ``kv_metrics`` once) has its own ZMQ PUB socket; its ``EventChannel`` record carries
  ``"transport": {"kind": "Zmq", "config": {"endpoint": "tcp://<host>:<port>"}}``, and
  the frontend's SUB socket connects to that endpoint when the record appears;
* each event is one multipart message of four frames:
  ``[topic (utf-8), publisher_id (u64 big-endian), sequence (u64 big-endian), frame]``,
  ``frame = version (1 byte, = 1) + length (u32 big-endian) + envelope`` and the envelope
  is the NATS plane's msgpack ``{publisher_id, sequence, published_at, topic, payload}``;
* ``<host>`` is ``DYN_EVENT_PLANE_HOST``. 1.6.1 binds ``0.0.0.0`` and only advertises that
  host; this plane binds exactly the advertised host (``WorkerConfig.event_plane_host``,
  default 127.0.0.1), so a worker never listens on more interfaces than it announces.

Sockets are opened by ``records()`` (before the worker registers, so the endpoint in the
record is live) and are only used from the event loop's sender task: pyzmq sockets are
not thread-safe, and publishers on other threads reach the loop through ``_submit``.
Sends never block: past the high-water mark a message is dropped with one warning, as
for NATS outages; a subscriber that joins late misses what was sent before (ZMQ PUB/SUB).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import msgpack
import zmq

from .kv_events import EventPlane, _Channel

__all__ = ["FRAME_VERSION", "ZmqEventPlane", "encode_frames"]

log = logging.getLogger(__name__)

FRAME_VERSION = 1
SNDHWM = 100_000  # as 1.6.1's ZMQ_SNDHWM
LINGER_MS = 200  # how long close() lets queued messages leave


def encode_frames(topic: str, envelope: bytes) -> list[bytes]:
    """The four frames 1.6.1 sends for one msgpack ``envelope`` (see the module doc)."""
    head = msgpack.unpackb(envelope, raw=False)
    publisher_id, sequence = int(head["publisher_id"]), int(head["sequence"])
    return [
        topic.encode(),
        publisher_id.to_bytes(8, "big"),
        sequence.to_bytes(8, "big"),
        struct.pack(">BI", FRAME_VERSION, len(envelope)) + envelope,
    ]


class ZmqEventPlane(EventPlane):
    """``EventPlane`` on ZMQ PUB sockets bound to ``host``. Built by ``connect``."""

    def __init__(self, ctx: zmq.Context, host: str, ns: str, comp: str, ep: str, worker_id: int):
        super().__init__(None, ns, comp, ep, worker_id)
        self._ctx = ctx
        self.host = host
        self._sockets: dict[int, tuple[zmq.Socket, str]] = {}  # publisher_id -> (socket, url)
        self._dropped = 0

    @classmethod
    async def connect(cls, host: str, ns: str, comp: str, ep: str, worker_id: int) -> ZmqEventPlane:
        return cls(zmq.Context(), host, ns, comp, ep, worker_id)

    def endpoint(self, channel: _Channel) -> str:
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

    def _transport(self, channel: _Channel) -> dict[str, Any]:
        return {"kind": "Zmq", "config": {"endpoint": self.endpoint(channel)}}

    async def _publish(self, channel: _Channel, envelope: bytes) -> None:
        self.endpoint(channel)
        sock = self._sockets[channel.publisher_id][0]
        try:
            sock.send_multipart(encode_frames(channel.topic, envelope), flags=zmq.NOBLOCK)
        except zmq.Again:
            self._dropped += 1
            self._warn("ZMQ event plane: send queue full, dropping KV events")

    async def _close_transport(self) -> None:
        for sock, _url in self._sockets.values():
            sock.close(linger=LINGER_MS)
        self._sockets.clear()
        # term() waits for the lingering messages; keep that wait off the event loop.
        await asyncio.to_thread(self._ctx.term)
