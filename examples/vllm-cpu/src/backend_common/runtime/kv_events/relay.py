"""``ZmqSource``: the worker subscribes to an engine's own ZMQ PUB socket of KV events.

vLLM (``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557"}'``) and SGLang (``--kv-events-config``) publish their cache
changes themselves. An engine wrapping one returns, per data-parallel rank::

    async def kv_event_sources(self):
        return [ZmqSource("tcp://127.0.0.1:5557", topic="", dp_rank=0)]

and the worker runs one ``ZmqKvRelay`` per source: it connects a SUB socket to
``endpoint`` (subscribed to ``topic``), decodes every batch (``decoder``) and
republishes each event through the rank's ``KvEventPublisher`` on the worker's event plane
(ZMQ or NATS), with the router's block hashing (``backend_common.kv_events.tokens_hash``,
LoRA-seeded).

Contract and invariants:

* ``start()`` is called once by ``setup_kv_routing`` before the worker registers; it raises
  ``DynamoError`` (InvalidArgument) for an endpoint ZMQ cannot parse. The relay then runs
  on its own daemon thread (decoding and hashing never run on the event loop) until the
  event plane's ``close()`` awaits ``stop()``.
* Nothing the engine sends stops the relay. Per message, in order:
  a message without exactly three frames or with a sequence frame that is not 8 bytes is
  counted as malformed and skipped; a sequence above the next expected one counts the
  missing batches; a sequence at or below the last one means the engine's publisher
  restarted (its count starts over): counted, and a ``cleared`` event is republished,
  because a restarted engine starts with an empty cache; a payload that is not a batch is
  counted and skipped; inside a batch every event is handled on its own: an unknown type
  or a malformed event is counted and skipped, the others go through. Each case logs a
  warning (the first few per kind, then one in every 1000).
* Events of a KV cache group that is not main attention (hybrid models: a
  ``kv_cache_spec_kind`` such as ``sliding_window`` or ``mamba``, learned per ``group_idx``
  from the stores; events of a group whose kind was never learned while others were) are
  filtered, as Dynamo filters them.
* ``BlockStored`` blocks whose ``block_size`` differs from the engine's
  ``kv_cache_block_size`` cannot match the router's hashes and are filtered (counted);
  when ``token_ids`` cover fewer blocks than ``block_hashes``, only the covered prefix is
  published (counted as a conversion issue). A batch whose ``data_parallel_rank`` is not
  the source's rank is filtered. ZMQ reconnects by itself when the engine's socket comes
  back at the same address.

Metrics (on the worker's ``/metrics``, with its labels plus ``dp_rank``), named as 1.6.1's
KV publisher names them where 1.6.1 has one:

* ``dynamo_component_kv_publisher_zmq_events_total{stage="received"|"accepted", event_type}``
* ``dynamo_component_kv_publisher_zmq_filtered_events_total{event_type, reason}``
* ``dynamo_component_kv_publisher_zmq_conversion_issues_total{event_type, reason}``
* ``dynamo_component_kv_publisher_zmq_malformed_messages_total{reason}``
* ``dynamo_component_kv_publisher_zmq_missed_batches_total`` (sequence gaps)
* ``dynamo_component_kv_publisher_zmq_publisher_restarts_total``
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter as Tally
from typing import TYPE_CHECKING

import zmq
from prometheus_client import CollectorRegistry, Counter

from ...errors import invalid_arg
from .decoder import (
    MAIN_ATTENTION_KINDS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventIssue,
    MalformedBatch,
    decode_batch,
    storage_tier,
)

if TYPE_CHECKING:
    from ...kv_events import KvEventPublisher, ZmqSource

__all__ = ["ZmqKvRelay", "ZmqSourceMetrics"]

log = logging.getLogger(__name__)

PREFIX = "dynamo_component_kv_publisher_"
POLL_MS = 100  # how often the relay thread looks at its stop flag
RCVHWM = 100_000  # as 1.6.1's subscriber
STOP_TIMEOUT_S = 2.0
WARN_FIRST = 5  # warnings logged per kind before sampling
WARN_EVERY = 1000  # then one in this many


class ZmqSourceMetrics:
    """The relays' counters; one instance per worker registry, shared by all its sources."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self._labels = dict(labels)
        names = [*self._labels, "dp_rank"]

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(PREFIX + name, doc, [*names, *extra], registry=registry)

        self.events = counter(
            "zmq_events", "ZMQ KV events seen by the relay, by stage.", "stage", "event_type"
        )
        self.filtered = counter(
            "zmq_filtered_events",
            "ZMQ KV events filtered before conversion.",
            "event_type",
            "reason",
        )
        self.conversion = counter(
            "zmq_conversion_issues",
            "ZMQ KV events dropped or shortened by conversion issues.",
            "event_type",
            "reason",
        )
        self.malformed = counter(
            "zmq_malformed_messages", "ZMQ messages that carried no usable batch.", "reason"
        )
        self.missed = counter(
            "zmq_missed_batches", "Batches missing from the engine's sequence (gaps)."
        )
        self.restarts = counter(
            "zmq_publisher_restarts", "Times the engine's sequence started over."
        )

    def labels(self, dp_rank: int) -> dict[str, str]:
        return {**self._labels, "dp_rank": str(dp_rank)}


class ZmqKvRelay:
    """One ``ZmqSource``: engine PUB socket -> ``KvEventPublisher``. See the module doc."""

    def __init__(
        self,
        source: ZmqSource,
        publisher: KvEventPublisher,
        metrics: ZmqSourceMetrics,
        *,
        context: zmq.Context | None = None,
    ) -> None:
        self.source = source
        self.endpoint = source.endpoint
        self.topic = source.topic or ""
        self.dp_rank = int(source.dp_rank)
        self._publisher = publisher
        self._block_size = publisher.block_size
        self._metrics = metrics
        self._labels = metrics.labels(self.dp_rank)
        self._ctx = context or zmq.Context.instance()
        self._last_sequence: int | None = None
        self._group_kinds: dict[int, str] = {}  # group_idx -> kv_cache_spec_kind
        self._warned: Tally[str] = Tally()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket: zmq.Socket | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise invalid_arg(f"ZmqSource endpoint {self.endpoint!r}: {exc}") from None
        # The socket is handed to the relay thread and used only there from now on.
        self._socket = sock
        self._thread = threading.Thread(
            target=self._run, name=f"zmq-kv-relay-{self.dp_rank}", daemon=True
        )
        self._thread.start()
        log.info("KV events of rank %d: subscribed to %s", self.dp_rank, self.endpoint)

    async def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, STOP_TIMEOUT_S)

    def _run(self) -> None:
        sock = self._socket
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(POLL_MS):
                    continue
                while not self._stop.is_set():
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.handle(frames)
                    except Exception:  # noqa: BLE001 - one bad message never ends the relay
                        log.exception("KV event relay: unexpected error; message skipped")
                        self._metrics.malformed.labels(**self._labels, reason="internal").inc()
        except zmq.ZMQError as exc:  # the context was terminated under us
            log.warning("KV event relay of rank %d stopped: %s", self.dp_rank, exc)
        finally:
            sock.close(linger=0)

    # -- one message -----------------------------------------------------------------------
    def handle(self, frames: list[bytes]) -> None:
        """Process one multipart message of the engine (called on the relay thread)."""
        if len(frames) != 3:
            self._malformed("frame_count", f"{len(frames)} frames, expected 3")
            return
        _topic, seq_frame, payload = frames
        if len(seq_frame) != 8:
            self._malformed("sequence_frame", f"sequence frame of {len(seq_frame)} bytes")
            return
        self._track_sequence(int.from_bytes(seq_frame, "big"))
        try:
            batch = decode_batch(payload)
        except MalformedBatch as exc:
            self._malformed("payload", str(exc))
            return
        if batch.data_parallel_rank is not None and batch.data_parallel_rank != self.dp_rank:
            for event in batch.events:
                self._filtered(_type_of(event), "wrong_dp_rank")
            self._warn(
                "wrong_dp_rank",
                f"batch of rank {batch.data_parallel_rank} on the source of rank {self.dp_rank}",
            )
            return
        for event in batch.events:
            self._relay(event)

    def _track_sequence(self, seq: int) -> None:
        last, self._last_sequence = self._last_sequence, seq
        if last is None:
            if seq > 0:
                self._metrics.missed.labels(**self._labels).inc(seq)
                self._warn("gap", f"first batch has sequence {seq}: {seq} earlier batches missed")
        elif seq > last + 1:
            self._metrics.missed.labels(**self._labels).inc(seq - last - 1)
            self._warn("gap", f"sequence jumped from {last} to {seq}: {seq - last - 1} missed")
        elif seq <= last:
            self._metrics.restarts.labels(**self._labels).inc()
            self._warn("restart", f"sequence went back from {last} to {seq}: publisher restarted")
            self._publisher.publish_cleared()

    def _relay(self, event: object) -> None:
        event_type = _type_of(event)
        self._metrics.events.labels(**self._labels, stage="received", event_type=event_type).inc()
        if isinstance(event, EventIssue):
            self._conversion(event.event_type, event.reason, event.detail)
            return
        reason = self._group_filter(event)
        if reason is not None:
            self._filtered(event_type, reason)
            return
        if isinstance(event, BlockStored):
            if not self._stored(event):
                return
        elif isinstance(event, BlockRemoved):
            self._publisher.publish_removed(
                event.block_hashes, storage_tier=storage_tier(event.medium)
            )
        elif isinstance(event, AllBlocksCleared):
            self._publisher.publish_cleared()
        self._metrics.events.labels(**self._labels, stage="accepted", event_type=event_type).inc()

    def _group_filter(self, event: object) -> str | None:
        """Why ``event`` belongs to a KV cache group the router does not index, or None."""
        group = getattr(event, "group_idx", None)
        kind = getattr(event, "kv_cache_spec_kind", None)
        if group is not None and kind is not None:
            self._group_kinds[group] = kind
        if kind is not None:
            return None if kind in MAIN_ATTENTION_KINDS else "non_main_attention_kind"
        if group is None:
            return None
        learned = self._group_kinds.get(group)
        if learned is None:
            # An engine that never names kinds has one group the router indexes; one that
            # does has not stored into this group yet, so its removal cannot be classified.
            return "unlearned_group_idx" if self._group_kinds else None
        return None if learned in MAIN_ATTENTION_KINDS else "non_main_attention_group"

    def _stored(self, event: BlockStored) -> bool:
        size = self._block_size
        if event.block_size != size:
            self._filtered("BlockStored", "block_size_mismatch")
            self._warn(
                "block_size",
                f"BlockStored with block_size {event.block_size}; the worker's is {size}",
            )
            return False
        n = min(len(event.block_hashes), len(event.token_ids) // size)
        if n < len(event.block_hashes):
            self._conversion(
                "BlockStored",
                "token_ids_too_short",
                f"{len(event.token_ids)} token ids for {len(event.block_hashes)} blocks",
            )
        if n == 0:
            return False
        self._publisher.publish_stored(
            event.token_ids[: n * size],
            [size] * n,
            event.block_hashes[:n],
            event.parent_block_hash,
            lora_name=event.lora_name,
            storage_tier=storage_tier(event.medium),
        )
        return True

    # -- accounting --------------------------------------------------------------------------
    def _malformed(self, reason: str, detail: str) -> None:
        self._metrics.malformed.labels(**self._labels, reason=reason).inc()
        self._warn(reason, f"malformed message: {detail}")

    def _filtered(self, event_type: str, reason: str) -> None:
        self._metrics.filtered.labels(**self._labels, event_type=event_type, reason=reason).inc()

    def _conversion(self, event_type: str, reason: str, detail: str) -> None:
        labels = dict(self._labels, event_type=event_type, reason=reason)
        self._metrics.conversion.labels(**labels).inc()
        self._warn(reason, detail)

    def _warn(self, kind: str, message: str) -> None:
        self._warned[kind] += 1
        n = self._warned[kind]
        if n <= WARN_FIRST or n % WARN_EVERY == 0:
            where = f"{self.endpoint} (rank {self.dp_rank})"
            log.warning("KV events from %s: %s [%d so far]", where, message, n)


def _type_of(event: object) -> str:
    if isinstance(event, EventIssue):
        return event.event_type
    return type(event).__name__
