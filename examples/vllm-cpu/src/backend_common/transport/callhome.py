"""The response stream of one request: the TCP call-home to the frontend.

The frames: docs/wire-protocol.md#response-stream-call-home.

Lifecycle, driven by the worker's request handler (one ``CallHome`` per request):

1. ``connect(address, subject, codec, on_control=...)`` opens the socket and sends the handshake;
2. ``send_prologue()`` (or ``send_prologue(error, typed_error)`` then ``close()``);
3. ``send_item(item)`` (or ``send_token_ids(ids)`` for an item that is only tokens) per output
   item — no await: the frame is queued and every frame queued during one event-loop
   iteration goes out in ONE ``transport.write``, so an engine that yields several tokens at
   once costs one send syscall, not one per token, and no frame waits longer than the current
   loop iteration. One ``call_soon`` per loop iteration flushes every stream that queued
   something (``_LoopFlusher``), not one per stream and token; the handler calls
   ``await drain()`` when frames back up (``backlogged``), which flushes and only waits when
   the buffer is over its high-water mark;
4. ``await finish()``: ``complete_final`` + ``sentinel``, drain, then close once the frontend has
   closed its side (bounded to ``linger`` seconds, so a silent peer cannot hold the socket).

The frontend talks back on the same socket with header-only ``"stop"`` / ``"kill"`` frames; a
background reader passes them to ``on_control``. End of stream from the frontend before
``finish()`` means the client is gone: ``peer_closed`` is set and ``on_control("kill")`` is called.
This side never sends ``stop``/``kill`` (the frontend treats that as a protocol violation).
Writes after the stream is closed (by either side) are dropped silently; the handler learns of
it through ``on_control`` / ``closed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Callable
from typing import Any

from .codec import (
    CODECS,
    WireError,
    final_frame,
    handshake_frame,
    item_frame,
    prologue_frame,
    read_two_part,
    sentinel_frame,
    split_address,
    token_item_frame,
)
from .tcp import set_nodelay

__all__ = ["CallHome"]

log = logging.getLogger(__name__)

OnControl = Callable[[str], None]

# Control frames from the frontend are tiny JSON strings; anything bigger is a protocol error.
_MAX_INBOUND_HEADER = 4096
_MAX_INBOUND_BODY = 64 * 1024


class _LoopFlusher:
    """Per event loop: the streams that queued frames this iteration, flushed by ONE callback.

    ``add(home)`` is called by a stream on its first queued frame of an iteration; the
    callback (scheduled with the first ``add``) writes every such stream's frames, in the
    order the streams queued them. A stream added after the callback ran schedules the next.
    """

    __slots__ = ("_loop", "_dirty", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[CallHome] = []

    def add(self, home: CallHome) -> None:
        if not self._dirty:
            self._loop.call_soon(self._run)
        self._dirty.append(home)

    def _run(self) -> None:
        dirty, self._dirty = self._dirty, []
        for home in dirty:
            home._flush()


_FLUSHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopFlusher] = (
    weakref.WeakKeyDictionary()
)


def _flusher(loop: asyncio.AbstractEventLoop) -> _LoopFlusher:
    flusher = _FLUSHERS.get(loop)
    if flusher is None:
        flusher = _FLUSHERS[loop] = _LoopFlusher(loop)
    return flusher


class CallHome:
    """One call-home response stream. Create with ``await CallHome.connect(...)``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        subject: str,
        codec: str,
        on_control: OnControl | None,
        linger: float,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        self.subject = subject
        self.codec = codec
        self._on_control = on_control
        self._linger = linger
        self._finished = False  # complete_final (or an error prologue) was sent
        self._closed = False
        self.peer_closed = False
        self.control: str | None = None  # last "stop"/"kill" received
        self._reader_task: asyncio.Task[None] | None = None
        # Frames written this loop iteration, flushed together by `_flush` (see the docstring).
        self._pending: list[bytes] = []
        self._flusher = _flusher(asyncio.get_running_loop())

    @classmethod
    async def connect(
        cls,
        address: str,
        subject: str,
        codec: str,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - bounds only the connect, not the stream
        on_control: OnControl | None = None,
        linger: float = 1.0,
    ) -> CallHome:
        """Connect to ``address`` (``ip:port``) and send the handshake.

        Raises ``WireError`` for a bad address or codec, ``OSError``/``TimeoutError`` when the
        frontend cannot be reached within ``timeout``.
        """
        if codec not in CODECS:
            raise WireError(f"unknown payload codec {codec!r}")
        host, port = split_address(address)
        # asyncio.timeout, not wait_for: no extra task and loop iteration on the TTFT path.
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
        set_nodelay(writer)
        self = cls(reader, writer, subject, codec, on_control, linger)
        writer.write(handshake_frame(subject))
        self._reader_task = asyncio.get_running_loop().create_task(self._read_control())
        return self

    @property
    def closed(self) -> bool:
        """True once this side closed, or the peer went away; writes are dropped from then on."""
        return self._closed or self.peer_closed or self._transport.is_closing()

    @property
    def backlogged(self) -> bool:
        """Frames of more than one item wait for this iteration's flush, or the transport
        holds unsent bytes: the writer should ``drain()``."""
        return len(self._pending) > 1 or self._transport.get_write_buffer_size() > 0

    @property
    def finished(self) -> bool:
        return self._finished

    def _write(self, frame: bytes) -> bool:
        if self.closed:
            return False
        pending = self._pending
        if not pending:
            self._flusher.add(self)
        pending.append(frame)
        return True

    def flush(self) -> None:
        """Write the queued frames now instead of at the end of this loop iteration (the
        handler does this for the first token, whose latency is the TTFT)."""
        self._flush()

    def _flush(self) -> None:
        """Write every queued frame at once (dropped if the stream closed meanwhile)."""
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if not self.closed:
            self._transport.write(data)

    def send_prologue(
        self, error: str | None = None, typed_error: dict[str, Any] | None = None
    ) -> None:
        """OK prologue, or an error prologue after which the handler should ``close()``."""
        self._write(prologue_frame(error, typed_error))
        if error is not None:
            self._finished = True  # no items follow; a peer close is no longer a cancellation

    def send_item(self, item: dict[str, Any]) -> None:
        """Write one Annotated item (e.g. ``{"data": {...LLMEngineOutput...}}``). No await.

        ``WireError`` if the item cannot be encoded with this stream's codec.
        """
        if not self.closed:
            self._write(item_frame(item, self.codec))

    def send_token_ids(self, token_ids: list[int]) -> None:
        """``send_item({"data": {"token_ids": token_ids}})``, without building the dict."""
        self._write(token_item_frame(token_ids, self.codec))

    def send_error_item(self, message: str, error: dict[str, Any] | None = None) -> None:
        """Mid-stream error item ``{"event": "error", "comment": [message], "error": {...}}``.

        ``error`` is the serialized ``DynamoError`` (``DynamoError.to_wire()``): the category
        the frontend acts on. ``comment`` carries the same text for readers that only know it.
        """
        item: dict[str, Any] = {"event": "error", "comment": [message]}
        if error is not None:
            item["error"] = error
        self.send_item(item)

    async def drain(self) -> None:
        """Wait while the transport buffer is over its high-water mark. Never raises on a lost
        connection (the reader reports it through ``on_control``)."""
        self._flush()
        if self.closed:
            return
        try:
            await self._writer.drain()
        except (ConnectionError, OSError):
            self._mark_peer_gone()

    async def finish(self) -> None:
        """Send ``complete_final`` + sentinel, drain, wait for the peer to close (bounded by
        ``linger``), then close. Safe to call on an already closed stream."""
        if not self._finished:
            self._finished = True
            self._write(final_frame(self.codec) + sentinel_frame())
        await self.drain()
        if self._reader_task is not None and not self.closed:
            # The frontend closes right after the sentinel; waiting for that avoids a reset.
            await asyncio.wait({self._reader_task}, timeout=self._linger)
        await self.close()

    async def close(self) -> None:
        """Close the socket now (after an error prologue, or on cancellation). Idempotent."""
        if self._closed:
            return
        self._flush()  # e.g. an error prologue written just before close()
        self._closed = True
        task = self._reader_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._writer.close()
        # asyncio.timeout, not wait_for: no extra task per request.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()

    def _mark_peer_gone(self) -> None:
        if self.peer_closed:
            return
        self.peer_closed = True
        if not self._finished:
            self._notify("kill")

    def _notify(self, signal: str) -> None:
        if signal in ("stop", "kill"):
            self.control = signal
        if self._on_control is None:
            return
        try:
            self._on_control(signal)
        except Exception:
            log.exception("on_control(%r) failed for stream %s", signal, self.subject)

    async def _read_control(self) -> None:
        """Read frames from the frontend until EOF; only header-only stop/kill mean anything."""
        try:
            while True:
                header, body = await read_two_part(
                    self._reader,
                    max_header=_MAX_INBOUND_HEADER,
                    max_body=_MAX_INBOUND_BODY,
                )
                msg: Any = None
                if header:
                    with contextlib.suppress(ValueError):
                        msg = json.loads(header)
                if msg in ("stop", "kill") and not body:
                    self._notify(msg)
                else:
                    log.debug("ignoring unexpected frame on call-home %s", self.subject)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except WireError as exc:
            log.warning("malformed frame on call-home %s: %s", self.subject, exc)
            self._transport.abort()
        self._mark_peer_gone()
