"""NATS request server (docs/wire-protocol.md#nats-request-plane), opt-in (``DYN_REQUEST_PLANE``).

The frontend sends one NATS request per call on ``{ns}_{comp}.{ep}-{id:x}``; the payload is the
TwoPart message itself (no TCP request frame) and the headers carry ``request-id`` etc. The worker
replies on the inbox with the ACK *before* processing: an empty payload = accepted, otherwise an
error string (same strings as the TCP ACK). The response still streams over the TCP call-home.

``NatsRequestServer`` subscribes with queue group ``q`` on a connection the caller owns, and has
the same ``admit``/``handle`` contract as ``TcpRequestServer`` (``admit`` gets the subject).
nats-py runs one subscription callback at a time, so the callback only ACKs and spawns the
handler task; handler exceptions are logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .dispatch import HandlerTasks

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = ["QUEUE_GROUP", "NatsRequestServer", "nats_subject"]

log = logging.getLogger(__name__)

QUEUE_GROUP = "q"

Admit = Callable[[str], str | None]
Handle = Callable[[str, dict[str, str], bytes], Awaitable[None] | None]


def nats_subject(ns: str, comp: str, ep: str, instance_id: int) -> str:
    """The request subject of one endpoint instance, e.g. ``dynamo_sample.generate-6a6c...``."""
    return f"{ns}_{comp}.{ep}-{instance_id:x}"


class NatsRequestServer:
    """Serves one endpoint subject on an existing NATS connection."""

    def __init__(self, nc: Client, subject: str, *, admit: Admit, handle: Handle) -> None:
        self._nc = nc
        self.subject = subject
        self._admit = admit
        self._handle = handle
        # One subscription per subject: the endpoint's, plus the subject of each new instance
        # id after a re-registration (the old one keeps serving requests routed before).
        self._subs: list[Subscription] = []
        self._handlers = HandlerTasks()

    @property
    def handler_tasks(self) -> frozenset[asyncio.Task[Any]]:
        return self._handlers.tasks

    async def start(self) -> None:
        """Subscribe (queue group ``q``) and flush so the subscription is live on return."""
        await self.add_subject(self.subject)

    async def add_subject(self, subject: str) -> None:
        """Also serve ``subject`` (same queue group and handlers); live on return."""
        self._subs.append(await self._nc.subscribe(subject, queue=QUEUE_GROUP, cb=self._on_msg))
        await self._sync()

    async def close(self) -> None:
        """Unsubscribe and flush, so the server routes no new request here once this returns.

        Running handler tasks keep running; the connection stays open (the caller owns it).
        """
        subs, self._subs = self._subs, []
        if not subs:
            return
        try:
            for sub in subs:
                await sub.unsubscribe()
            await self._sync()
        except Exception as exc:  # connection already closed or draining
            log.debug("NATS unsubscribe of %s failed: %s", self.subject, exc)

    async def _sync(self) -> None:
        """Return once the server has processed our queued SUB/UNSUB.

        nats-py 2.16 queues SUB/UNSUB for its flusher task but writes flush()'s PING directly,
        so one PONG can precede the SUB reaching the server. By the time a first round trip
        completes the flusher has written the queue; the second PING is then behind it.
        """
        await self._nc.flush(timeout=2)
        await self._nc.flush(timeout=2)

    async def _on_msg(self, msg: Msg) -> None:
        subject = msg.subject
        try:
            error = self._admit(subject)
        except Exception:
            log.exception("admit(%r) failed", subject)
            error = "Server unavailable: request admission failed"
        if msg.reply:
            try:
                await msg.respond(error.encode("utf-8") if error else b"")
            except Exception as exc:
                log.warning("cannot ACK NATS request on %s: %s", subject, exc)
                return
        else:
            log.warning("NATS request on %s has no reply subject; processing anyway", subject)
        if error is not None:
            return
        headers = {str(k): str(v) for k, v in (msg.headers or {}).items()}
        self._handlers.dispatch(self._handle, subject, subject, headers, msg.data)
