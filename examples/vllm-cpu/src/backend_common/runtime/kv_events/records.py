"""The discovery records that announce a worker's KV event publishers (pure functions).

docs/wire-protocol.md#kv-events. One ``EventChannel`` record per channel (a topic and a
publisher id) says where its events travel; one ``EventSource`` record per kv-events
publisher ties it to its worker and data-parallel rank. Both are bound to the worker's lease;
the event plane builds them (``EventPlane.records``) and the worker registers them with its
other records.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "KV_EVENTS_TOPIC",
    "KV_METRICS_TOPIC",
    "event_channel_record",
    "event_source_record",
    "subject_prefix",
]

KV_EVENTS_TOPIC = "kv-events"
KV_METRICS_TOPIC = "kv_metrics"


def subject_prefix(ns: str, comp: str, ep: str) -> str:
    """The NATS subject prefix of an endpoint's event channels (``{prefix}.{topic}``)."""
    return f"namespace.{ns}.component.{comp}.endpoint.{ep}"


def _scope(ns: str, comp: str, ep: str) -> dict[str, Any]:
    return {"kind": "endpoint", "endpoint": {"namespace": ns, "component": comp, "name": ep}}


def _key(bucket: str, ns: str, comp: str, ep: str, topic: str, publisher_id: int) -> str:
    return (
        f"v1/{bucket}/namespace/{ns}/component/{comp}/endpoint/{ep}/topic/{topic}/{publisher_id:x}"
    )


def event_channel_record(
    ns: str, comp: str, ep: str, topic: str, publisher_id: int, transport: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """``(key, EventChannel record)`` announcing a publisher of ``topic`` on ``transport``."""
    value = {
        "type": "EventChannel",
        "scope": _scope(ns, comp, ep),
        "topic": topic,
        "instance_id": publisher_id,
        "transport": transport,
    }
    return _key("event_channels", ns, comp, ep, topic, publisher_id), value


def event_source_record(
    ns: str, comp: str, ep: str, publisher_id: int, worker_id: int, dp_rank: int
) -> tuple[str, dict[str, Any]]:
    """``(key, EventSource record)`` tying a kv-events publisher to its worker and rank."""
    value = {
        "type": "EventSource",
        "scope": _scope(ns, comp, ep),
        "topic": KV_EVENTS_TOPIC,
        "publisher_id": publisher_id,
        "metadata": {
            "kv_state_endpoint": {"namespace": ns, "component": comp, "name": ep},
            "worker": {"worker_id": worker_id, "dp_rank": dp_rank},
            "publisher_id": publisher_id,
        },
    }
    return _key("event_sources", ns, comp, ep, KV_EVENTS_TOPIC, publisher_id), value
