"""The wire layer: framing (``codec``), the TCP and NATS request planes (``tcp``, ``nats``) and
the TCP call-home response stream (``callhome``) of Dynamo 1.6.x (wire.md §3, §4).

Nothing here knows about engines or discovery; the worker wires these pieces together.
``nats`` imports nats-py only for type checking, so importing it costs nothing without NATS.
"""

from __future__ import annotations

from .callhome import CallHome
from .codec import ControlMessage, WireError
from .nats import NatsRequestServer, nats_subject
from .tcp import TcpRequestServer

__all__ = [
    "CallHome",
    "ControlMessage",
    "NatsRequestServer",
    "TcpRequestServer",
    "WireError",
    "nats_subject",
]
