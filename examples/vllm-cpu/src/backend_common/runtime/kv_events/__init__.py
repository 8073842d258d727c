"""The worker's KV event machinery: what feeds Dynamo's KV-aware router.

The engine-facing half (source descriptors, the snapshot value, block hashing, the publisher
interfaces) is ``backend_common.kv_events``; this package implements it. Contract:
docs/contract.md#kv-events-and-snapshots; bytes: docs/wire-protocol.md#kv-events.

``routing``     ``setup_kv_routing``: the worker's one call at start-up (engine hooks -> plane)
``plane``       ``EventPlane``: channels' records, one sender task, a pluggable transport
``transports``  ``NatsTransport`` and ``ZmqTransport`` (1.6.1's default; its four frames)
``channel``     ``Channel``: one (topic, publisher id) stream of envelopes
``publishers``  the KV event, load and snapshot publishers an engine calls
``records``     the EventChannel and EventSource discovery records
``relay``       ``ZmqKvRelay``: an engine's own ZMQ socket (``ZmqSource``) -> a publisher
``decoder``     pure decoder of vLLM's and SGLang's KV event batches (no I/O)

Wire format (per publisher; both transports carry the same envelope): NATS subject
``namespace.{ns}.component.{comp}.endpoint.{ep}.{topic}``; message = msgpack envelope
``{publisher_id, sequence, published_at (ms), topic, payload: bytes}``; ``kv-events`` payload
= ``[RouterEvent]`` with ``{worker_id, storage_tier: "device", residency_domain: "worker",
event: {event_id, data: {"stored": {...}} | {"removed": {...}}, dp_rank}}``; ``kv_metrics``
payload (the router's load signal, sent on change) = ``{worker_id, dp_rank,
active_decode_blocks, active_prefill_tokens, kv_used_blocks}``. Discovery records: one
``EventChannel`` per topic and publisher, and one ``EventSource`` per kv-events publisher, all
bound to the worker's lease.
"""
