"""From an accepted request to a finished response stream.

``EngineAdapter.handle(incoming)`` is called by the request plane (TCP or NATS,
``transport.plane``) once per accepted request, after the ACK went out and the
control header was decoded. It

1. calls home to the frontend (handshake first, so the frontend's wait ends);
2. decodes the ``PreprocessedRequest`` (``incoming.decode()``) and checks it
   (``backend_common.request_policy``); a bad one gets a typed error prologue;
3. runs ``engine.generate`` and writes each item as it comes;
4. ends the stream with ``complete_final`` + ``sentinel``.

The whole path, frame to engine and back: docs/architecture.md#path-of-one-request.

Invariants:

* The prologue waits for the engine's first item, so an ``InvalidArgument``
  raised before any output becomes a typed error prologue (HTTP 400 at the
  frontend, worker stays in rotation). Any other failure, and any failure after
  the first item, is an error item in the stream carrying the serialized
  ``DynamoError`` (``DynamoError.to_wire``): the frontend takes from it the HTTP
  status / SSE error code, whether to retry on another worker and whether to take
  this one out of rotation (docs/wire-protocol.md#how-the-frontend-reacts). An
  untyped prologue would sideline the worker.
* Exactly one terminal reaches the frontend; items after it are dropped and the
  engine's generator is closed. A stream that ends without a terminal gets a
  ``StreamIncomplete`` error item.
* ``abort(ctx)`` runs at most once per request, only when the request was
  cancelled (frontend ``stop``/``kill``, the frontend closing the response stream
  before the terminal, or shutdown), never on a natural end.
* Every accepted request is tracked in ``active`` until its stream is done, on
  every path; ``wait_idle`` lets shutdown wait for in-flight streams.
* Nothing a client or the network sends can raise out of ``handle``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ..config import DisaggregationMode, EngineConfig
from ..context import GenerateContext
from ..engine import LLMEngine
from ..errors import (
    DynamoError,
    from_exception,
    response_timeout,
    stream_incomplete,
    unknown,
)
from ..request_policy import check_request
from ..streams import close_stream
from ..transport.callhome import CallHome
from ..transport.codec import WireError
from ..transport.plane import IncomingRequest
from ..types import FinishReason, LLMEngineOutput, PreprocessedRequest
from ..validate import ContractViolation, maybe_validated
from .metrics import WorkerMetrics
from .tracing import GenerateTracer

__all__ = ["ActiveRequest", "EngineAdapter"]

log = logging.getLogger(__name__)

# Every this many items, drain and yield to the event loop when frames are backing up (the
# engine produced several without awaiting, or the socket buffer is not empty), so that such an
# engine cannot starve other streams, delay a `kill` or grow the buffer without bound. An engine
# that suspends per token (the usual case) costs no extra loop iteration.
YIELD_EVERY = 16

# After a `kill` (client gone), how long an engine may ignore it before its task is cancelled.
KILL_GRACE_S = 2.0


async def _inactivity_bounded(
    stream: AsyncIterator[LLMEngineOutput], seconds: float
) -> AsyncIterator[LLMEngineOutput]:
    """Re-yield ``stream``; raise ``ResponseTimeout`` when the next item takes over ``seconds``.

    Only wrapped around a stream when the knob is set, so the default path costs nothing.
    """
    it = aiter(stream)
    try:
        while True:
            bound = asyncio.timeout(seconds)
            try:
                async with bound:
                    item = await anext(it)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not bound.expired():
                    raise  # the engine's own TimeoutError
                raise response_timeout(
                    f"engine produced no output for {seconds:g}s (DYN_ENGINE_STREAM_TIMEOUT_SECS)"
                ) from None
            yield item
    finally:
        await close_stream(it)


class ActiveRequest:
    __slots__ = ("ctx", "aborted", "abort_deferred", "task")

    def __init__(self, ctx: GenerateContext) -> None:
        self.ctx = ctx
        self.aborted = False  # abort() was decided for this request (at most once)
        self.abort_deferred = False  # decided, but waiting for the first token (decode)
        self.task: asyncio.Task[Any] | None = None


class EngineAdapter:
    def __init__(
        self,
        engine: LLMEngine,
        *,
        mode: DisaggregationMode = DisaggregationMode.AGGREGATED,
        metrics: WorkerMetrics | None = None,
        validate: bool = False,
        engine_config: EngineConfig | None = None,
        stream_timeout: float | None = None,
        tracer: GenerateTracer | None = None,
    ) -> None:
        self.engine = engine
        self.mode = mode
        self.metrics = metrics
        # Stream-rule checks on every stream (WorkerConfig.debug_validate).
        self.validate = validate
        # Limits for request_policy.check_request (context length, vocabulary size).
        self.engine_config = engine_config
        # Longest wait for the engine's next item (WorkerConfig.engine_stream_timeout; None: off).
        self.stream_timeout = stream_timeout
        # The engine.generate span (WorkerConfig.tracing); None: tracing off, no cost per item.
        self.tracer = tracer
        self.active: dict[str, ActiveRequest] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    # -- shutdown support ------------------------------------------------------
    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def cancel_all(self) -> int:
        """Ask every in-flight stream to end with a ``cancelled`` terminal."""
        for entry in list(self.active.values()):
            self._cancel(entry, kill=False)
        return len(self.active)

    def new_entry(
        self,
        request_id: str,
        *,
        metadata: dict[str, str] | None = None,
        trace_headers: dict[str, str] | None = None,
    ) -> ActiveRequest:
        """The bookkeeping of one request; its context reports the first token back here."""
        holder: list[ActiveRequest] = []
        ctx = GenerateContext(
            request_id,
            metadata=metadata,
            trace_headers=trace_headers,
            on_first_token=lambda: self._on_first_token(holder[0]),
        )
        holder.append(ActiveRequest(ctx))
        return holder[0]

    def _on_first_token(self, entry: ActiveRequest) -> None:
        if entry.abort_deferred:
            entry.abort_deferred = False
            asyncio.get_running_loop().create_task(self._abort(entry.ctx))

    def _cancel(self, entry: ActiveRequest, *, kill: bool) -> None:
        if kill:
            entry.ctx.kill()
        else:
            entry.ctx.stop_generating()
        if not entry.aborted:
            entry.aborted = True
            loop = asyncio.get_running_loop()
            if self.mode is DisaggregationMode.DECODE and not entry.ctx.first_token_seen:
                # A decode worker aborts only once its first token exists: an earlier abort
                # could strand the prefill peer's KV transfer (docs/contract.md#cancellation).
                # A stream that ends before its first token is never aborted.
                entry.abort_deferred = True
                log.debug("deferring engine.abort() until first-token observed")
            else:
                loop.create_task(self._abort(entry.ctx))
            if kill:
                # The client is gone. An engine that ignores kill (stuck in an await) must not
                # keep the request in flight forever: cancel its task after a grace period.
                loop.call_later(KILL_GRACE_S, self._unstick, entry)

    def _unstick(self, entry: ActiveRequest) -> None:
        task = entry.task
        if task is not None and not task.done() and self.active.get(entry.ctx.id()) is entry:
            log.warning(
                "request %s: engine ignored kill for %.1fs; cancelling it",
                entry.ctx.id(),
                KILL_GRACE_S,
            )
            task.cancel()

    async def _abort(self, ctx: GenerateContext) -> None:
        try:
            await self.engine.abort(ctx)
        except Exception:  # noqa: BLE001 - abort failures never affect the stream
            log.debug("engine.abort raised; ignoring", exc_info=True)

    # -- one request -------------------------------------------------------------
    async def handle(self, incoming: IncomingRequest) -> None:
        """Serve one accepted request to its end. Never raises (see the module invariants)."""
        control = incoming.control
        entry = self.new_entry(
            control.id, metadata=control.metadata, trace_headers=incoming.trace_headers
        )
        entry.task = asyncio.current_task()
        self.active[control.id] = entry
        self._idle.clear()
        if self.metrics is not None:
            self.metrics.request_started()
        started = time.monotonic()
        try:
            await self._serve(incoming, entry)
        except Exception:  # noqa: BLE001 - last line of defence: log, never crash
            log.exception("request %s failed in the worker", control.id)
        finally:
            self.active.pop(control.id, None)
            if not self.active:
                self._idle.set()
            if self.metrics is not None:
                self.metrics.request_finished(time.monotonic() - started)

    async def _serve(self, incoming: IncomingRequest, entry: ActiveRequest) -> None:
        control, ctx = incoming.control, entry.ctx

        def on_control(kind: str) -> None:
            self._cancel(entry, kill=(kind == "kill"))

        try:
            home = await CallHome.connect(
                control.address, control.subject, control.payload_codec, on_control=on_control
            )
        except (OSError, TimeoutError) as exc:
            log.warning("request %s: cannot call home to %s: %s", control.id, control.address, exc)
            return
        try:
            try:
                request = incoming.decode()
                check_request(request, self.engine_config, self.mode)
            except DynamoError as err:
                home.send_prologue(err.message, typed_error=_typed(err))
                return
            if await self._stream(home, request, ctx):
                # The frontend closed the response stream before the terminal without a
                # stop/kill (its client went away): a cancellation, so the engine is told.
                self._cancel(entry, kill=True)
        finally:
            await home.close()

    async def _stream(
        self, home: CallHome, request: PreprocessedRequest, ctx: GenerateContext
    ) -> bool:
        """Relay the engine's items; True when the frontend went away before the terminal.

        Every way out of a stream the frontend still reads ends the same: the prologue (once),
        exactly one terminal (the engine's, or an error item from ``_end_with_error``), then
        ``home.finish()``. The one exception is an ``InvalidArgument`` raised before any item:
        a typed prologue (HTTP 400) and nothing else.
        """
        progress = _Progress()
        stream = None
        try:
            stream = self._open_stream(request, ctx)
            gone = await self._relay(home, stream, ctx, progress)
            if gone is not None:
                return gone
        except ContractViolation as exc:
            log.error("request %s: %s", ctx.id(), exc)
            _end_with_error(home, progress, unknown(str(exc)))
        except Exception as exc:  # noqa: BLE001 - engine errors become typed errors
            err = from_exception(exc)
            if not isinstance(exc, DynamoError):
                log.warning("request %s: engine raised %s", ctx.id(), err)
            if not progress.prologue_sent and err.is_invalid_argument:
                home.send_prologue(err.message, typed_error=_typed(err))
                return False
            _end_with_error(home, progress, err)
        finally:
            if stream is not None:
                try:
                    await close_stream(stream)
                except Exception:  # noqa: BLE001
                    log.debug("closing the engine stream raised", exc_info=True)
        if home.closed:
            return False  # the engine's stream had ended: nothing to abort
        if not progress.terminal:
            err = stream_incomplete("engine stream ended without a terminal item")
            _end_with_error(home, progress, err)
        await home.finish()
        return False

    def _open_stream(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        """``engine.generate`` wrapped, as configured, by the checker, the bound and the span."""
        stream = maybe_validated(self.engine.generate(request, ctx), self.mode, on=self.validate)
        if self.stream_timeout:
            stream = _inactivity_bounded(stream, self.stream_timeout)
        if self.tracer is not None:
            stream = self.tracer.wrap(stream, request, ctx)
        return stream

    async def _relay(
        self,
        home: CallHome,
        stream: AsyncIterator[LLMEngineOutput],
        ctx: GenerateContext,
        progress: _Progress,
    ) -> bool | None:
        """Frame each item until the terminal; None when the stream ended (with or without a
        terminal), else whether the frontend went away before the terminal."""
        count = 0
        async for item in stream:
            if count == 0 and not progress.prologue_sent:
                home.send_prologue()
                progress.prologue_sent = True
            if item.token_ids and not ctx.first_token_seen:
                ctx.notify_first_token()
            if home.closed:
                # The frontend is gone (client disconnect): nothing more can be read.
                return not ctx.is_stopped()
            try:
                token_ids = item.plain_token_ids()
                if token_ids is not None:
                    home.send_token_ids(token_ids)
                else:
                    home.send_item({"data": item.to_dict()})
            except WireError as exc:
                # An item the codec cannot encode is the engine's bug, not the client's.
                log.error("request %s: cannot encode engine item: %s", ctx.id(), exc)
                _end_with_error(
                    home, progress, unknown(f"engine produced an unencodable item: {exc}")
                )
                return None
            if count == 0:
                # Later frames coalesce per loop iteration; the first one (the TTFT) goes now.
                home.flush()
            if item.finish_reason is not None:
                progress.terminal = True
                if item.finish_reason is FinishReason.ERROR:
                    log.debug("request %s ended with error: %s", ctx.id(), item.error_message)
                return None
            count += 1
            if count % YIELD_EVERY == 0 and home.backlogged:
                # The engine did not suspend since the last flush, or the socket is behind:
                # apply back-pressure and give other streams (and a `kill`) a turn.
                await home.drain()
                await asyncio.sleep(0)
        return None


class _Progress:
    """What one response stream has sent so far."""

    __slots__ = ("prologue_sent", "terminal")

    def __init__(self) -> None:
        self.prologue_sent = False
        self.terminal = False


def _end_with_error(home: CallHome, progress: _Progress, err: DynamoError) -> None:
    """The stream's terminal is ``err``: the prologue first if it is not out yet."""
    if not progress.prologue_sent:
        home.send_prologue()
        progress.prologue_sent = True
    home.send_error_item(err.message, err.to_wire())
    progress.terminal = True


def _typed(err: DynamoError) -> dict[str, str]:
    return {"error_type": err.wire_error_type(), "message": err.message}
