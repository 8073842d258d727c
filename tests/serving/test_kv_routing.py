"""KV-aware routing: the real 1.6.1 frontend's KV router follows our workers' KV events.

Two mocker workers (the rendered ``examples/mocker-cuda``) publish block stored/removed
events and load metrics on the NATS event plane; the frontend runs ``--router-mode kv``.
First, fresh prompts are sent until both workers have served one (both are routable).
Then each of several distinct long prompts is sent repeatedly, one request at a time. The
worker that served each request is told apart by its ``dynamo_component_requests_total``
on ``/metrics``. With working KV events every repeat lands on the worker that already
holds the prompt's blocks; without them the router has no overlap to go by and a repeat
lands on the first worker about half of the time.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request

import aiohttp
import msgpack
import pytest
from conftest import REPO, RUNTIME_SRC, Stack, free_port

from backend_common.devstack.openai import chat
from backend_common.errors import DynamoError
from backend_common.kv_events import sequence_block_hashes, tokens_hash
from backend_common.runtime.kv_events.plane import EventPlane
from backend_common.runtime.kv_events.transports import NatsTransport

MOCKER_SRC = REPO / "examples" / "mocker-cuda" / "src"
MOCKER_ARGS = (
    "--event-plane",
    "nats",
    "--device",
    "none",
    "--speedup-ratio",
    "100",
    "--block-size",
    "4",
)
PREFIXES = 6
REPEATS = 4


def requests_total(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("dynamo_component_requests_total")
    )


def mocker_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(MOCKER_SRC), str(RUNTIME_SRC), str(REPO)])}


def start_mockers(stack: Stack, model: str, n: int) -> list[int]:
    ports = []
    for _ in range(n):
        port = free_port()
        stack.start_worker(
            model, *MOCKER_ARGS, module="mocker_cuda", system_port=port, env=mocker_env()
        )
        ports.append(port)
    procs = stack.workers[-n:]
    stack.frontend.wait_for_model(model, timeout=60, watch=procs)
    return ports


# Captured from the real Dynamo 1.6.1 mocker (block size 4) for the prompt tokens below: the
# tokens_hash of each block and the chained block_hash it published in its kv-events.
CAPTURED_TOKENS = [2049, 2048, 2048, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2048, 2048]
CAPTURED_TOKENS_HASHES = [
    3079028129563261768,
    10427734772032889443,
    12156943688308240685,
    8906183847324352865,
]
CAPTURED_BLOCK_HASHES = [3079028129563261768, 14169442396624401245]


def test_hashes_match_what_dynamo_publishes() -> None:
    blocks = [CAPTURED_TOKENS[i : i + 4] for i in range(0, 16, 4)]
    assert [tokens_hash(b) for b in blocks] == CAPTURED_TOKENS_HASHES
    assert sequence_block_hashes(CAPTURED_TOKENS, 4)[:2] == CAPTURED_BLOCK_HASHES


class FakeNats:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.sent.append((subject, data))

    async def drain(self) -> None:
        pass


async def test_wire_format_of_events_and_load() -> None:
    nc = FakeNats()
    plane = EventPlane(NatsTransport(nc), "ns", "comp", "ep", worker_id=(1 << 63) + 5)
    pub = plane.kv_publisher(dp_rank=0, block_size=4)
    hashes = sequence_block_hashes(CAPTURED_TOKENS, 4)
    pub.publish_stored(CAPTURED_TOKENS[:8], [4, 4], hashes[:2], None)
    pub.publish_removed(hashes[:1])
    plane.load.publish(0, 7)
    plane.load.publish(0, 7)  # unchanged: not sent again
    await plane.close()
    assert [s for s, _ in nc.sent] == [
        "namespace.ns.component.comp.endpoint.ep.kv-events",
        "namespace.ns.component.comp.endpoint.ep.kv-events",
        "namespace.ns.component.comp.endpoint.ep.kv_metrics",
    ]
    envs = [msgpack.unpackb(d) for _, d in nc.sent]
    assert [e["sequence"] for e in envs[:2]] == [0, 1]
    assert envs[0]["topic"] == "kv-events" and envs[0]["publisher_id"] == pub.publisher_id
    (stored,) = msgpack.unpackb(envs[0]["payload"])
    assert stored["worker_id"] == (1 << 63) + 5
    assert stored["event"]["event_id"] == 1 and stored["event"]["dp_rank"] == 0
    data = stored["event"]["data"]["stored"]
    assert data["parent_hash"] is None
    assert [b["tokens_hash"] for b in data["blocks"]] == CAPTURED_TOKENS_HASHES[:2]
    assert [b["block_hash"] for b in data["blocks"]] == CAPTURED_BLOCK_HASHES
    (removed,) = msgpack.unpackb(envs[1]["payload"])
    assert removed["event"]["data"] == {"removed": {"block_hashes": hashes[:1]}}
    assert msgpack.unpackb(envs[2]["payload"]) == {
        "worker_id": (1 << 63) + 5,
        "dp_rank": 0,
        "active_decode_blocks": None,
        "active_prefill_tokens": None,
        "kv_used_blocks": 7,
    }
    keys = [k for k, _ in plane.records((1 << 63) + 5)]
    prefix = "v1/event_sources/namespace/ns/component/comp/endpoint/ep/topic/kv-events/"
    assert f"{prefix}{pub.publisher_id:x}" in keys
    with pytest.raises(DynamoError):
        pub.publish_stored([1, 2, 3], [3], [1])  # a partial block cannot be matched


@pytest.mark.e2e
async def test_repeated_prefixes_stick_to_the_worker_holding_them(make_stack) -> None:
    stack: Stack = make_stack("file", "tcp", router_mode="kv", event_plane="nats")
    model = "tiny-kv"
    ports = start_mockers(stack, model, 2)
    # The model is listed once the first worker is in; give discovery a moment for the second.
    await asyncio.sleep(1.0)

    same = 0
    served = {p: 0 for p in ports}
    async with aiohttp.ClientSession() as session:
        # Both workers must be routable, or "every repeat reached the holder" would also hold
        # when everything goes to one worker. Fresh prompts (distinct words) have no cached
        # prefix to steer them; keep sending them until both workers served one (at most 30).
        probes = {p: 0 for p in ports}
        for n in range(30):
            before = {p: requests_total(p) for p in ports}
            probe = " ".join(f"w{1000 + n * 31 + i}" for i in range(12))
            resp = await chat(
                session, stack.frontend.base_url, model, probe, max_tokens=2, stream=False
            )
            assert resp.status == 200, resp.error
            for p in ports:
                probes[p] += requests_total(p) > before[p]
            if all(probes.values()):
                break
        assert all(probes.values()), f"one worker never received a request: {probes}"
        for k in range(PREFIXES):
            # A long prompt unique to this group (many full 4-token blocks), shared by its repeats.
            prompt = " ".join(f"w{(k * 97 + i) % 900 + 10}" for i in range(48))
            first = None
            for r in range(REPEATS):
                before = {p: requests_total(p) for p in ports}
                resp = await chat(
                    session, stack.frontend.base_url, model, prompt, max_tokens=2, stream=False
                )
                assert resp.status == 200, resp.error
                after = {p: requests_total(p) for p in ports}
                hit = [p for p in ports if after[p] > before[p]]
                assert len(hit) == 1, (before, after)
                served[hit[0]] += 1
                if r == 0:
                    first = hit[0]
                elif hit[0] == first:
                    same += 1
                # Let the stored events reach the router before the repeat.
                await asyncio.sleep(0.3)

    repeats = PREFIXES * (REPEATS - 1)
    # Chance (no KV information) is about 50%; the KV router should hit the holder every time
    # (one miss allowed for an event still in flight on a loaded machine).
    print(f"\nprobes per worker {probes}; served {served}; {same}/{repeats} repeats on the holder")
    assert same >= repeats - 1, f"only {same}/{repeats} repeats reached the prefix holder"
