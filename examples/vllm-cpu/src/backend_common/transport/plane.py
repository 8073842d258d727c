"""``RequestPlane``: how requests reach the worker, one interface for TCP and NATS.

The worker builds one plane from its ``WorkerConfig`` (``request_plane_for``) and drives it::

    plane = request_plane_for(config, admit=..., handle=adapter.handle)
    await plane.start(instance_id)          # listening / subscribed on return
    transport = plane.transport(instance_id)  # the Endpoint record's "transport" value
    ...
    await plane.serve_instance(new_id)      # after a lease re-registration (new instance id)
    await plane.close()                     # stop taking requests; running handlers go on

Per request the plane reads the frame, asks ``admit()`` (``None``: accept; a string: the
refusal, sent as the ACK), ACKs, and runs ``handle(IncomingRequest)`` as its own task. It
decodes the TwoPart body and its control header first; a request that cannot be answered
(no decodable control header, or a response transport other than ``tcp_server``) is logged
and dropped, since there is no address to answer on. The request body itself stays encoded
until ``IncomingRequest.decode()``: the adapter calls home first, so the frontend's wait for
the response stream ends as early as possible (docs/architecture.md#path-of-one-request).

Both planes answer on the TCP call-home (``callhome``); only the way in differs:

* ``TcpRequestPlane``: one TCP server; the frame path names the endpoint, and a path for
  another endpoint is refused (``Server unavailable: unknown endpoint ...``).
* ``NatsRequestPlane``: a NATS connection it owns (``nats_options``); one subscription per
  instance subject (``{ns}_{comp}.{ep}-{id:x}``), a new one added on re-registration.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..config import NatsOptions, WorkerConfig
from ..discovery.base import nats_transport, tcp_transport
from ..errors import invalid_arg
from ..types import PreprocessedRequest
from .codec import ControlMessage, WireError, decode_payload, decode_two_part, parse_control
from .nats import NatsRequestServer, nats_subject
from .tcp import TcpRequestServer

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "IncomingRequest",
    "NatsRequestPlane",
    "RequestPlane",
    "TcpRequestPlane",
    "decode_incoming",
    "request_plane_for",
]

log = logging.getLogger(__name__)

Admit = Callable[[], str | None]


@dataclass
class IncomingRequest:
    """One accepted request: its control header, frame headers and still-encoded body."""

    control: ControlMessage
    headers: dict[str, str]
    body: bytes

    @property
    def trace_headers(self) -> dict[str, str]:
        """The W3C ``traceparent`` / ``tracestate`` headers the request arrived with."""
        return {k: v for k, v in self.headers.items() if k in ("traceparent", "tracestate")}

    def decode(self) -> PreprocessedRequest:
        """The ``PreprocessedRequest``; a typed ``InvalidArgument`` if the body is malformed."""
        try:
            return PreprocessedRequest.from_dict(
                decode_payload(self.body, self.control.payload_codec)
            )
        except (WireError, ValidationError, TypeError, ValueError) as exc:
            raise invalid_arg(f"malformed request body: {_short(exc)}") from None


Handle = Callable[[IncomingRequest], Awaitable[None]]


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def decode_incoming(
    where: str, headers: dict[str, str], body: bytes, *, max_body: int
) -> IncomingRequest | None:
    """The request in an accepted frame's body, or None (logged) if it cannot be answered."""
    try:
        header, payload = decode_two_part(body, max_body=max_body)
        control = parse_control(header)
    except WireError as exc:
        # Without a control header there is no address to answer on.
        log.warning("dropping undecodable request on %s: %s", where, exc)
        return None
    if control.transport != "tcp_server":
        log.warning("request %s: unsupported response transport %r", control.id, control.transport)
        return None
    return IncomingRequest(control, headers, payload)


class RequestPlane(ABC):
    """Accepts requests for one endpoint and hands each to ``handle`` (see the module doc)."""

    def __init__(self, *, admit: Admit, handle: Handle, max_message_size: int) -> None:
        self._admit = admit
        self._handle = handle
        self._max_message_size = max_message_size

    @abstractmethod
    async def start(self, instance_id: int) -> None:
        """Start taking requests for ``instance_id``; live on return. Called once."""

    @abstractmethod
    def transport(self, instance_id: int) -> dict[str, Any]:
        """The ``transport`` value of the Endpoint record for ``instance_id`` (after ``start``)."""

    async def serve_instance(self, instance_id: int) -> None:  # noqa: B027 - optional
        """Also take requests addressed to ``instance_id`` (a re-registration's new id)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop taking requests and release connections; running handlers keep running."""

    async def _on_request(self, where: str, headers: dict[str, str], body: bytes) -> None:
        # Runs as the request's own task, after its ACK went out.
        incoming = decode_incoming(where, headers, body, max_body=self._max_message_size)
        if incoming is not None:
            await self._handle(incoming)


class TcpRequestPlane(RequestPlane):
    """The TCP request plane: one server, the frame path names the endpoint."""

    def __init__(
        self,
        host: str,
        port: int,
        ns: str,
        comp: str,
        ep: str,
        *,
        admit: Admit,
        handle: Handle,
        max_message_size: int,
    ) -> None:
        super().__init__(admit=admit, handle=handle, max_message_size=max_message_size)
        self._names = (ns, comp, ep)
        self._suffix = f"/{ns}/{comp}/{ep}"
        self.server = TcpRequestServer(
            host,
            port,
            admit=self._admit_path,
            handle=self._on_request,
            max_body=max_message_size,
        )

    def _admit_path(self, path: str) -> str | None:
        # Any instance id prefix is served: after a re-registration the frontend may still
        # address the old one, and both are this process.
        if not path.endswith(self._suffix):
            return f"Server unavailable: unknown endpoint {path}"
        return self._admit()

    async def start(self, instance_id: int) -> None:
        await self.server.start()

    def transport(self, instance_id: int) -> dict[str, Any]:
        return tcp_transport(self.server.host, self.server.port, instance_id, *self._names)

    async def close(self) -> None:
        await self.server.close()


class NatsRequestPlane(RequestPlane):
    """The NATS request plane: its own connection, one subscription per instance subject."""

    def __init__(
        self,
        servers: str,
        options: NatsOptions,
        ns: str,
        comp: str,
        ep: str,
        *,
        admit: Admit,
        handle: Handle,
        max_message_size: int,
    ) -> None:
        super().__init__(admit=admit, handle=handle, max_message_size=max_message_size)
        self._servers = servers
        self._options = options
        self._names = (ns, comp, ep)
        self._nc: Client | None = None
        self.server: NatsRequestServer | None = None

    def subject(self, instance_id: int) -> str:
        return nats_subject(*self._names, instance_id)

    async def start(self, instance_id: int) -> None:
        import nats

        from .nats_options import nats_connect_options

        self._nc = await nats.connect(**nats_connect_options(self._servers, self._options))
        self.server = NatsRequestServer(
            self._nc,
            self.subject(instance_id),
            admit=lambda _subject: self._admit(),
            handle=self._on_request,
        )
        await self.server.start()

    def transport(self, instance_id: int) -> dict[str, Any]:
        return nats_transport(self.subject(instance_id))

    async def serve_instance(self, instance_id: int) -> None:
        # The subject embeds the instance id: listen on the new one too (the old one keeps
        # serving requests routed before the change).
        assert self.server is not None
        await self.server.add_subject(self.subject(instance_id))

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self._nc is not None:
            await self._nc.close()


def request_plane_for(config: WorkerConfig, *, admit: Admit, handle: Handle) -> RequestPlane:
    """The plane ``config.request_plane`` names, set up from ``config`` (not started)."""
    names = (config.namespace, config.component, config.endpoint)
    if config.request_plane == "nats":
        return NatsRequestPlane(
            config.nats_server,
            config.nats,
            *names,
            admit=admit,
            handle=handle,
            max_message_size=config.max_message_size,
        )
    return TcpRequestPlane(
        config.tcp_host,
        config.tcp_port,
        *names,
        admit=admit,
        handle=handle,
        max_message_size=config.max_message_size,
    )
