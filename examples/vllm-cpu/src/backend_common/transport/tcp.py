"""TCP request plane server (docs/wire-protocol.md#tcp-request-plane).

One ``TcpRequestServer`` per worker process serves every endpoint; the frame path
(``{id:x}/{ns}/{comp}/{ep}``) says which. The frontend keeps persistent connections and
pipelines requests on them, matching ACKs first-in first-out, so per connection:

* frames are read one after another and each is ACKed before the next is read — ACKs are
  therefore strictly in arrival order, and sent before any model work;
* ``admit(path)`` decides the ACK synchronously: ``None`` → empty ACK (accepted), a string →
  that string as the ACK (``"Server unavailable: ..."`` makes the frontend retry elsewhere);
* an accepted request's ``handle(path, headers, body)`` is started as its own task after the
  ACK is written, so requests on one connection run concurrently. A handler's exception is
  logged and never touches the connection.

A malformed frame is logged once at warning and closes only that connection. ``close()`` stops
accepting and closes connections but leaves handler tasks running: the worker drains them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from .codec import MAX_MESSAGE_LEN, WireError, encode_ack, read_request_frame
from .dispatch import HandlerTasks

__all__ = ["TcpRequestServer"]

log = logging.getLogger(__name__)

Admit = Callable[[str], str | None]
Handle = Callable[[str, dict[str, str], bytes], Awaitable[None] | None]


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """Disable Nagle on a stream's socket (small frames must not wait for an ACK of the last)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (tests with pipes), or already closed
        pass


class TcpRequestServer:
    """Accepts request frames, ACKs them in order, and dispatches accepted ones to ``handle``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        admit: Admit,
        handle: Handle,
        max_body: int = MAX_MESSAGE_LEN,
    ) -> None:
        self._bind_host = host
        self._bind_port = port
        self._admit = admit
        self._handle = handle
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._handlers = HandlerTasks()
        self._max_body = max_body
        self._closing = False

    async def start(self) -> None:
        """Bind and start accepting. The bound port is ``port`` afterwards."""
        self._server = await asyncio.start_server(
            self._serve_connection, self._bind_host, self._bind_port
        )

    @property
    def host(self) -> str:
        if self._server is None or not self._server.sockets:
            return self._bind_host
        return self._server.sockets[0].getsockname()[0]

    @property
    def port(self) -> int:
        """The bound port (the OS-assigned one when 0 was requested); valid after ``start``."""
        if self._server is None or not self._server.sockets:
            return self._bind_port
        return self._server.sockets[0].getsockname()[1]

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    @property
    def handler_tasks(self) -> frozenset[asyncio.Task[Any]]:
        """Handler tasks still running (for a worker that wants to await them on shutdown)."""
        return self._handlers.tasks

    async def close(self) -> None:
        """Stop accepting, close every connection, wait (bounded) for their readers to end.

        Running handler tasks are not cancelled.
        """
        self._closing = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections.values()):
            writer.close()
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for t in pending:
                t.cancel()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except TimeoutError:
                log.debug("request server did not close within 2 s")

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        set_nodelay(writer)
        peer = writer.get_extra_info("peername")
        try:
            if self._closing:
                return
            await self._read_loop(reader, writer, peer)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _read_loop(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any
    ) -> None:
        while not self._closing:
            try:
                path, headers, body = await read_request_frame(reader, max_body=self._max_body)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    log.warning("request connection %s closed mid-frame", peer)
                return
            except WireError as exc:
                log.warning("malformed request frame from %s, closing connection: %s", peer, exc)
                return
            except (ConnectionError, OSError):
                return
            error = self._call_admit(path)
            writer.write(encode_ack(error))
            if error is None:
                self._handlers.dispatch(self._handle, path, path, headers, body)
            try:
                # Back-pressure only: returns at once unless the peer stopped reading ACKs.
                await writer.drain()
            except (ConnectionError, OSError):
                return

    def _call_admit(self, path: str) -> str | None:
        try:
            return self._admit(path)
        except Exception:
            log.exception("admit(%r) failed", path)
            return "Server unavailable: request admission failed"
