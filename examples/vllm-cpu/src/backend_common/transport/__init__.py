"""The wire layer of Dynamo 1.6.x (docs/wire-protocol.md): how requests come in and go out.

* ``plane``: the ``RequestPlane`` interface the worker uses (``TcpRequestPlane``,
  ``NatsRequestPlane``, ``request_plane_for(config, ...)``), decoding every accepted
  request down to an ``IncomingRequest``;
* ``tcp``, ``nats``: the two request servers under it (frames, ACKs), sharing ``dispatch``;
* ``codec``: pure framing and payload codecs; ``callhome``: the response stream;
  ``nats_options``: NATS credentials, TLS and reconnects.

Nothing here knows about engines or the worker (``runtime``); a plane's ``transport``
record value comes from ``discovery.base``. ``nats`` imports nats-py only for type
checking, so importing this package costs nothing without NATS.
"""

from __future__ import annotations

from .callhome import CallHome
from .codec import ControlMessage, WireError
from .nats import NatsRequestServer, nats_subject
from .plane import (
    IncomingRequest,
    NatsRequestPlane,
    RequestPlane,
    TcpRequestPlane,
    request_plane_for,
)
from .tcp import TcpRequestServer

__all__ = [
    "CallHome",
    "ControlMessage",
    "IncomingRequest",
    "NatsRequestPlane",
    "NatsRequestServer",
    "RequestPlane",
    "TcpRequestPlane",
    "TcpRequestServer",
    "WireError",
    "nats_subject",
    "request_plane_for",
]
