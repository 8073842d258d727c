"""KV events from an engine's ZMQ socket (vLLM / SGLang format) and the ZMQ event plane.

Fixtures are real encodings: ``VLLM_BATCH`` and ``SGLANG_BATCH`` were produced by
msgspec 0.23 from the engines' own struct declarations (vLLM's ``KVEventBatch`` with an
``array_like`` batch and tagged-map events; SGLang's ``array_like`` tagged events), and
``CAPTURED_161_MESSAGE`` is one message a real Dynamo 1.6.1 worker sent on its ZMQ event
plane. The expected ``tokens_hash`` values come from 1.6.1's ``compute_block_hash_for_seq``.
"""

from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import pytest
import zmq
from prometheus_client import CollectorRegistry

from backend_common.config import EngineConfig, WorkerConfig
from backend_common.errors import DynamoError
from backend_common.kv_events import ZmqSource
from backend_common.runtime.kv_events.decoder import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventIssue,
    MalformedBatch,
    decode_batch,
    storage_tier,
)
from backend_common.runtime.kv_events.plane import EventPlane
from backend_common.runtime.kv_events.relay import ZmqKvRelay, ZmqSourceMetrics
from backend_common.runtime.kv_events.routing import setup_kv_routing
from backend_common.runtime.kv_events.transports import NatsTransport, ZmqTransport, encode_frames

TOKENS = list(range(100, 116))
H1, H2, H3 = 0x1111111111111111, 0xF222222222222222, 0x3333333333333333
# compute_block_hash_for_seq(TOKENS[:8], 4) and (TOKENS[8:12], 4, lora_name="sql-adapter").
TOKENS_HASHES = [6320977984009303047, 16988655349664461655]
LORA_TOKENS_HASH = 16495712290166724487

VLLM_BATCH = bytes.fromhex(
    "93cb41da4b2f981000009488a474797065ab426c6f636b53746f726564ac626c6f636b5f686173686573"
    "92cf1111111111111111cff222222222222222b1706172656e745f626c6f636b5f68617368c0a9746f6b"
    "656e5f696473986465666768696a6baa626c6f636b5f73697a6504a76c6f72615f6964c0a66d65646975"
    "6da3475055a96c6f72615f6e616d65c089a474797065ab426c6f636b53746f726564ac626c6f636b5f68"
    "617368657391cf3333333333333333b1706172656e745f626c6f636b5f68617368cff222222222222222"
    "a9746f6b656e5f696473946c6d6e6faa626c6f636b5f73697a6504a76c6f72615f696407a66d65646975"
    "6da3435055a96c6f72615f6e616d65ab73716c2d61646170746572a967726f75705f6964780083a47479"
    "7065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391cf1111111111111111a66d6564"
    "69756da347505581a474797065b0416c6c426c6f636b73436c656172656400"
)
SGLANG_BATCH = bytes.fromhex(
    "92cb41da4b2f982000009396ab426c6f636b53746f72656492fb09c0986465666768696a6b04c092ac"
    "426c6f636b52656d6f76656491fb91b0416c6c426c6f636b73436c6561726564"
)
# A removed event from the real 1.6.1 sample worker, as its ZMQ PUB socket sent it.
CAPTURED_161_MESSAGE = [
    bytes.fromhex(h)
    for h in (
        "6b762d6576656e7473",
        "000c94bcc972df3a",
        "0000000000000001",
        "01000000cb85ac7075626c69736865725f6964cf000c94bcc972df3aa873657175656e636501ac7075"
        "626c69736865645f6174cf000001a22e2cae63a5746f706963a96b762d6576656e7473a77061796c6f"
        "6164c47a9184a9776f726b65725f6964cfee5e71e0da1ee5baac73746f726167655f74696572a64465"
        "76696365b07265736964656e63795f646f6d61696ea6776f726b6572a56576656e7483a86576656e74"
        "5f696402a46461746181a772656d6f76656481ac626c6f636b5f686173686573920102a764705f7261"
        "6e6b00",
    )
]


# -- building vLLM frames with msgpack, field for field as msgspec encodes them ----------------
def vllm_stored(hashes, parent, tokens, block_size=4, *, lora_id=None, medium="GPU", lora=None):
    # Tag first, then fields in declaration order; lora_id, medium and lora_name have no
    # default and are always present; fields with defaults are omitted when unset.
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": block_size,
        "lora_id": lora_id,
        "medium": medium,
        "lora_name": lora,
    }


def vllm_removed(hashes, medium="GPU"):
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


def vllm_batch(events, ts=1764540000.25, dp_rank=0) -> bytes:
    return msgpack.packb([ts, events, dp_rank])  # EventBatch is array_like


def message(seq: int, payload: bytes, topic: bytes = b"") -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), payload]


def test_msgpack_builder_reproduces_msgspec_bytes() -> None:
    second = vllm_stored([H3], H2, TOKENS[8:12], lora_id=7, medium="CPU", lora="sql-adapter")
    second["group_idx"] = 0
    events = [
        vllm_stored([H1, H2], None, TOKENS[:8]),
        second,
        vllm_removed([H1]),
        {"type": "AllBlocksCleared"},
    ]
    assert vllm_batch(events) == VLLM_BATCH


# -- decoding ---------------------------------------------------------------------------------
def test_decode_vllm_batch() -> None:
    batch = decode_batch(VLLM_BATCH)
    assert batch.ts == 1764540000.25 and batch.data_parallel_rank == 0
    assert batch.events == [
        BlockStored([H1, H2], None, TOKENS[:8], 4, None, "GPU"),
        BlockStored([H3], H2, TOKENS[8:12], 4, "sql-adapter", "CPU", group_idx=0),
        BlockRemoved([H1], "GPU"),
        AllBlocksCleared(),
    ]


def test_decode_sglang_batch() -> None:
    # SGLang: tagged arrays, no rank in the batch, signed hashes (taken modulo 2**64).
    batch = decode_batch(SGLANG_BATCH)
    assert batch.data_parallel_rank is None
    neg5 = (1 << 64) - 5
    assert batch.events == [
        BlockStored([neg5, 9], None, TOKENS[:8], 4),
        BlockRemoved([neg5]),
        AllBlocksCleared(),
    ]


def test_decode_map_batch_and_byte_hashes() -> None:
    digest = bytes(range(32))  # vLLM with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0
    payload = msgpack.packb(
        {
            "ts": 1.5,
            "events": [vllm_stored([digest], None, TOKENS[:4]), vllm_removed([digest])],
            "data_parallel_rank": 2,
        }
    )
    batch = decode_batch(payload)
    as_int = int.from_bytes(digest[-8:], "big")
    assert batch.data_parallel_rank == 2
    assert batch.events[0].block_hashes == [as_int]
    assert batch.events[1] == BlockRemoved([as_int], "GPU")


def test_unknown_and_malformed_events_do_not_take_the_batch_down() -> None:
    payload = vllm_batch(
        [
            {"type": "BlockMoved", "block_hashes": [1]},
            vllm_stored([1], None, TOKENS[:4], block_size=0),
            vllm_stored("nope", None, TOKENS[:4]),
            ["BlockRemoved"],
            7,
            vllm_removed([5]),
        ]
    )
    events = decode_batch(payload).events
    issues = [(e.event_type, e.reason) for e in events if isinstance(e, EventIssue)]
    assert issues == [
        ("unknown", "unknown_event_type"),
        ("BlockStored", "malformed_event"),
        ("BlockStored", "malformed_event"),
        ("BlockRemoved", "malformed_event"),
        ("unknown", "malformed_event"),
    ]
    assert events[-1] == BlockRemoved([5], "GPU")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgpack.packb(5),
        msgpack.packb([1.0]),
        msgpack.packb(["ts", []]),
        msgpack.packb([1.0, {"a": 1}]),
        msgpack.packb([1.0, [], "rank"]),
        msgpack.packb({"ts": 1.0}),
        VLLM_BATCH[:40],
    ],
)
def test_decode_rejects_what_is_not_a_batch(payload: bytes) -> None:
    with pytest.raises(MalformedBatch):
        decode_batch(payload)


def test_storage_tiers() -> None:
    assert [storage_tier(m) for m in (None, "GPU", "cpu", "DISK", "weird")] == [
        "device",
        "device",
        "host_pinned",
        "disk",
        "device",
    ]


# -- the relay: engine frames in, router events out --------------------------------------------
class FakeNats:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.sent.append((subject, data))

    async def drain(self) -> None:
        pass


def router_events(nc: FakeNats) -> list[dict]:
    out = []
    for subject, data in nc.sent:
        if subject.endswith(".kv-events"):
            out.extend(msgpack.unpackb(msgpack.unpackb(data)["payload"]))
    return out


def data_of(events: list[dict]) -> list:
    return [e["event"]["data"] for e in events]


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(
        f"dynamo_component_kv_publisher_{name}_total", {"dp_rank": "0", **labels}
    )
    return value or 0.0


def make_relay(dp_rank: int = 0, block_size: int = 4, endpoint: str = "tcp://127.0.0.1:1"):
    nc = FakeNats()
    plane = EventPlane(NatsTransport(nc), "ns", "comp", "ep", worker_id=42)
    registry = CollectorRegistry()
    metrics = ZmqSourceMetrics(registry, {})
    relay = ZmqKvRelay(
        ZmqSource(endpoint, dp_rank=dp_rank), plane.kv_publisher(dp_rank, block_size), metrics
    )
    return relay, plane, nc, registry


async def test_relay_republishes_a_vllm_batch_with_the_routers_hashes() -> None:
    relay, plane, nc, registry = make_relay()
    relay.handle(message(0, VLLM_BATCH))
    await plane.close()
    events = router_events(nc)
    assert [e["worker_id"] for e in events] == [42] * 4
    assert [e["storage_tier"] for e in events] == ["device", "host_pinned", "device", "device"]
    first, second = events[0]["event"]["data"]["stored"], events[1]["event"]["data"]["stored"]
    assert first["parent_hash"] is None
    assert [b["block_hash"] for b in first["blocks"]] == [H1, H2]
    assert [b["tokens_hash"] for b in first["blocks"]] == TOKENS_HASHES
    assert second["parent_hash"] == H2
    assert [b["tokens_hash"] for b in second["blocks"]] == [LORA_TOKENS_HASH]
    assert data_of(events)[2:] == [{"removed": {"block_hashes": [H1]}}, "cleared"]
    assert [e["event"]["event_id"] for e in events] == [1, 2, 3, 4]
    for kind in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
        assert metric(registry, "zmq_events", stage="received", event_type=kind) >= 1
    assert metric(registry, "zmq_events", stage="accepted", event_type="BlockStored") == 2


async def test_gaps_restarts_and_garbage_are_counted_and_survived() -> None:
    relay, plane, nc, registry = make_relay()
    ok = lambda h: vllm_batch([vllm_removed([h])])  # noqa: E731
    relay.handle(message(0, ok(1)))
    relay.handle(message(3, ok(2)))  # batches 1 and 2 never arrived
    relay.handle(message(4, b"\xc1garbage"))
    relay.handle([b"", b"\x00" * 8])  # two frames
    relay.handle([b"", b"\x00" * 4, ok(99)])  # short sequence frame
    relay.handle(message(5, vllm_batch([{"type": "BlockMoved"}, vllm_removed([3])])))
    relay.handle(message(0, ok(4)))  # the engine restarted: its sequence starts over
    relay.handle(message(1, ok(5)))
    await plane.close()
    assert data_of(router_events(nc)) == [
        {"removed": {"block_hashes": [1]}},
        {"removed": {"block_hashes": [2]}},
        {"removed": {"block_hashes": [3]}},
        "cleared",  # what the restarted engine's cache holds: nothing yet
        {"removed": {"block_hashes": [4]}},
        {"removed": {"block_hashes": [5]}},
    ]
    assert metric(registry, "zmq_missed_batches") == 2
    assert metric(registry, "zmq_publisher_restarts") == 1
    assert metric(registry, "zmq_malformed_messages", reason="payload") == 1
    assert metric(registry, "zmq_malformed_messages", reason="frame_count") == 1
    assert metric(registry, "zmq_malformed_messages", reason="sequence_frame") == 1
    labels = {"event_type": "unknown", "reason": "unknown_event_type"}
    assert metric(registry, "zmq_conversion_issues", **labels) == 1


async def test_blocks_the_router_cannot_match_are_filtered() -> None:
    relay, plane, nc, registry = make_relay(dp_rank=0, block_size=4)
    relay.handle(message(0, vllm_batch([vllm_stored([1], None, TOKENS[:16], block_size=16)])))
    relay.handle(message(1, vllm_batch([vllm_removed([1])], dp_rank=1)))  # another rank's
    relay.handle(message(2, vllm_batch([vllm_stored([1, 2, 3], None, TOKENS[:9])])))
    await plane.close()
    (only,) = router_events(nc)
    blocks = only["event"]["data"]["stored"]["blocks"]
    assert [b["block_hash"] for b in blocks] == [1, 2]  # the tokens cover two blocks
    labels = {"event_type": "BlockStored"}
    assert metric(registry, "zmq_filtered_events", reason="block_size_mismatch", **labels) == 1
    filtered = {"event_type": "BlockRemoved", "reason": "wrong_dp_rank"}
    assert metric(registry, "zmq_filtered_events", **filtered) == 1
    short = {"event_type": "BlockStored", "reason": "token_ids_too_short"}
    assert metric(registry, "zmq_conversion_issues", **short) == 1


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def test_relay_over_a_real_socket_survives_a_publisher_restart() -> None:
    # Each "engine process" has its own context; XPUB is PUB on the wire and also tells the
    # test when the relay's subscription arrived.
    ctx = zmq.Context()
    engine = ctx.socket(zmq.XPUB)
    port = engine.bind_to_random_port("tcp://127.0.0.1")
    relay, plane, nc, registry = make_relay(endpoint=f"tcp://127.0.0.1:{port}")
    relay.start()
    plane.on_close(relay.stop)  # as setup_kv_routing wires it
    try:
        assert engine.poll(10_000), "the relay never subscribed"
        engine.recv()
        engine.send_multipart(message(0, vllm_batch([vllm_stored([H1], None, TOKENS[:4])])))
        engine.send_multipart(message(1, b"not msgpack \xc1"))
        engine.send_multipart(message(2, vllm_batch([vllm_removed([H1])])))
        await wait_for(lambda: len(router_events(nc)) == 2)
        engine.close(linger=0)  # the engine process goes away ...
        ctx.term()
        ctx = zmq.Context()  # ... and a new one binds the same address
        engine = ctx.socket(zmq.XPUB)
        engine.bind(f"tcp://127.0.0.1:{port}")
        assert engine.poll(10_000), "the relay did not reconnect"
        engine.recv()
        engine.send_multipart(message(0, vllm_batch([vllm_stored([H2], None, TOKENS[4:8])])))
        await wait_for(lambda: len(router_events(nc)) == 4)
    finally:
        await plane.close()  # stops the relay first
        engine.close(linger=0)
        ctx.term()
    assert not relay._thread.is_alive()
    assert data_of(router_events(nc))[1:3] == [{"removed": {"block_hashes": [H1]}}, "cleared"]
    assert metric(registry, "zmq_publisher_restarts") == 1
    assert metric(registry, "zmq_malformed_messages", reason="payload") == 1


# -- the ZMQ event plane (publisher side, as 1.6.1) -------------------------------------------
def test_frames_match_a_real_1_6_1_message() -> None:
    envelope = CAPTURED_161_MESSAGE[3][5:]
    head = msgpack.unpackb(envelope)
    frames = encode_frames("kv-events", head["publisher_id"], head["sequence"], envelope)
    assert frames == CAPTURED_161_MESSAGE


async def test_zmq_plane_advertises_loopback_sockets_and_sends_1_6_1_frames() -> None:
    plane = EventPlane(ZmqTransport("127.0.0.1"), "ns", "comp", "ep", worker_id=7)
    pub = plane.kv_publisher(dp_rank=0, block_size=4)
    records = dict(plane.records(7))
    prefix = "v1/event_channels/namespace/ns/component/comp/endpoint/ep/topic/kv-events/"
    key = f"{prefix}{pub.publisher_id:x}"
    transport = records[key]["transport"]
    assert transport["kind"] == "Zmq"
    endpoint = transport["config"]["endpoint"]
    assert endpoint.startswith("tcp://127.0.0.1:")
    metrics_channel = [v for v in records.values() if v.get("topic") == "kv_metrics"][0]
    assert metrics_channel["transport"]["config"]["endpoint"] != endpoint  # a socket each

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    sub.connect(endpoint)
    try:
        # PUB drops what it sends before the subscription arrives: send until one lands.
        deadline = time.monotonic() + 10
        while not sub.poll(0):
            assert time.monotonic() < deadline, "nothing arrived on the advertised endpoint"
            pub.publish_removed([1])
            await asyncio.sleep(0.05)
        frames = sub.recv_multipart()
    finally:
        sub.close(linger=0)
        ctx.term()
        await plane.close()
    topic, pid, seq, frame = frames
    assert topic == b"kv-events" and int.from_bytes(pid, "big") == pub.publisher_id
    assert frame[0] == 1 and int.from_bytes(frame[1:5], "big") == len(frame) - 5
    envelope = msgpack.unpackb(frame[5:])
    assert envelope["sequence"] == int.from_bytes(seq, "big")
    assert envelope["publisher_id"] == pub.publisher_id and envelope["topic"] == "kv-events"
    (event,) = msgpack.unpackb(envelope["payload"])
    assert event["worker_id"] == 7 and event["event"]["data"] == {"removed": {"block_hashes": [1]}}


async def test_an_endpoint_zmq_cannot_parse_is_a_typed_error() -> None:
    relay, plane, _nc, _registry = make_relay(endpoint="tcp://no port here")
    with pytest.raises(DynamoError) as info:
        relay.start()
    await plane.close()
    assert info.value.is_invalid_argument
    assert "tcp://no port here" in str(info.value)


def test_event_plane_settings_come_from_the_environment(monkeypatch) -> None:
    import argparse

    from backend_common.args import add_common_args, worker_config_from_args

    def config():
        parser = argparse.ArgumentParser()
        add_common_args(parser)
        return worker_config_from_args(parser.parse_args(["--model-name", "m"]))

    monkeypatch.delenv("DYN_EVENT_PLANE", raising=False)
    monkeypatch.delenv("DYN_EVENT_PLANE_HOST", raising=False)
    assert (config().event_plane, config().event_plane_host) == (None, "127.0.0.1")
    monkeypatch.setenv("DYN_EVENT_PLANE", "zmq")
    monkeypatch.setenv("DYN_EVENT_PLANE_HOST", "10.1.2.3")
    assert (config().event_plane, config().event_plane_host) == ("zmq", "10.1.2.3")


async def test_only_main_attention_groups_of_hybrid_models_reach_the_router() -> None:
    relay, plane, nc, registry = make_relay()

    def stored(h: int, group: int, kind: str) -> dict:
        event = vllm_stored([h], None, TOKENS[:4])
        event.update(group_idx=group, kv_cache_spec_kind=kind)
        return event

    def removed(h: int, group: int) -> dict:
        return {**vllm_removed([h]), "group_idx": group}

    batch = [
        stored(1, 0, "full_attention"),
        stored(2, 1, "sliding_window"),
        removed(2, 1),  # group 1 is sliding window: not indexed
        removed(3, 2),  # group 2 never stored: cannot be classified
        removed(1, 0),
    ]
    relay.handle(message(0, vllm_batch(batch)))
    await plane.close()
    data = data_of(router_events(nc))
    assert [list(d) for d in data] == [["stored"], ["removed"]]
    assert [b["block_hash"] for b in data[0]["stored"]["blocks"]] == [1]
    assert data[1] == {"removed": {"block_hashes": [1]}}
    for event_type, reason in (
        ("BlockStored", "non_main_attention_kind"),
        ("BlockRemoved", "non_main_attention_group"),
        ("BlockRemoved", "unlearned_group_idx"),
    ):
        labels = {"event_type": event_type, "reason": reason}
        assert metric(registry, "zmq_filtered_events", **labels) == 1


class ZmqEngine:
    def __init__(self, *endpoints: str) -> None:
        self.endpoints = endpoints

    async def kv_event_sources(self) -> list[ZmqSource]:
        return [ZmqSource(e, dp_rank=r) for r, e in enumerate(self.endpoints)]

    def component_metrics_dp_ranks(self) -> list[int]:
        return []


def relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("zmq-kv-relay")]


async def test_setup_kv_routing_wires_zmq_sources_to_the_zmq_plane_by_default() -> None:
    config = WorkerConfig(namespace="ns", component="c", endpoint="e", discovery_backend="file")
    engine_config = EngineConfig(model="m", kv_cache_block_size=4)
    registry = CollectorRegistry()
    engine = ZmqEngine("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    plane = await setup_kv_routing(engine, config, engine_config, 5, registry, {})
    assert plane is not None and isinstance(plane.transport, ZmqTransport)
    assert len(relay_threads()) == 2
    sources = [v for _, v in plane.records(5) if v["type"] == "EventSource"]
    assert sorted(s["metadata"]["worker"]["dp_rank"] for s in sources) == [0, 1]
    await plane.close()
    assert relay_threads() == []

    # One endpoint ZMQ cannot parse: a typed error, and the relay already started is stopped.
    with pytest.raises(DynamoError):
        await setup_kv_routing(
            ZmqEngine("tcp://127.0.0.1:1", "bogus"),
            config,
            engine_config,
            5,
            CollectorRegistry(),
            {},
        )
    assert relay_threads() == []
