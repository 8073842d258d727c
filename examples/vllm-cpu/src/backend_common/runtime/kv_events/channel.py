"""One stream of event envelopes (a topic and a publisher id), as the event plane sends it.

Envelope format: docs/wire-protocol.md#kv-events. Shared by the plane (``plane.py``), the
publishers that own one channel each (``publishers.py``) and the transports that carry the
bytes (``transports.py``).
"""

from __future__ import annotations

import random
import time
from typing import Any, Protocol

import msgpack

__all__ = ["Channel", "EventDropped", "Submit"]


class EventDropped(Exception):
    """Raised by a transport that dropped an event on purpose (the message says why)."""


class Channel:
    """One (topic, publisher_id) stream of envelopes with a gap-free ``sequence``.

    Made by ``EventPlane.channel``; ``envelope`` is called only by the plane's sender task,
    once per event, in order, so sequences never skip.
    """

    __slots__ = ("_sequence", "prefix", "publisher_id", "subject", "topic")

    def __init__(self, prefix: str, topic: str) -> None:
        self.prefix = prefix
        self.topic = topic
        # Dynamo's publisher ids stay below 2^53 (they travel in JSON).
        self.publisher_id = random.getrandbits(52) | 1
        self.subject = f"{prefix}.{topic}"
        self._sequence = 0

    def envelope(self, payload: Any) -> tuple[int, bytes]:
        """The next ``(sequence, msgpack envelope)`` carrying ``payload``."""
        sequence = self._sequence
        body = {
            "publisher_id": self.publisher_id,
            "sequence": sequence,
            "published_at": int(time.time() * 1000),
            "topic": self.topic,
            "payload": msgpack.packb(payload, use_bin_type=True),
        }
        self._sequence += 1
        return sequence, msgpack.packb(body, use_bin_type=True)


class Submit(Protocol):
    """``EventPlane.submit``: queue one event of a channel, from any thread, never blocking."""

    def __call__(self, channel: Channel, data: Any, **extra: Any) -> None: ...
