"""KV-aware routing with events that arrive over ZMQ in vLLM's format (issue 13).

The real 1.6.1 frontend runs ``--router-mode kv`` with its default event plane (ZMQ: no
``--event-plane``). Two reference workers (``tests.zmq_kv_engine``) serve the model; worker A
subscribes with a ``ZmqSource`` to a ZMQ PUB socket that this test owns and on which it
plays a vLLM engine: ``KVEventBatch`` frames with ``BlockStored`` events for a set of
prompt prefixes. Worker A republishes them on its ZMQ event plane, from which the frontend's
KV router learns that A holds those prefixes.

* Control (no events): repeated prefixes are spread over both workers (which also shows
  that both are routable).
* With events: every request whose prompt starts with a published prefix goes to A.

Which worker served a request is read from each worker's ``dynamo_component_requests_total``.
Prompts are token ids (``/v1/completions``), so the router hashes exactly the ids the test
published.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request

import aiohttp
import msgpack
import pytest
import zmq
from conftest import Stack, free_port

MODEL = "tiny-kv-zmq"
BLOCK = 16  # the reference engine's kv_cache_block_size
PREFIX_BLOCKS = 4
PREFIXES = 4
REPEATS = 3
# Control run: the chance that 12 requests with no KV information all land on one of two
# workers is 2 * 0.5**12 (< 0.1%).
CONTROL_PREFIXES = 4


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric_sum(text: str, name: str, *needles: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(n in line for n in needles):
            total += float(line.rpartition(" ")[2])
    return total


def requests_total(port: int) -> float:
    return metric_sum(scrape(port), "dynamo_component_requests_total")


def vllm_batch(events: list, ts: float) -> bytes:
    # msgspec's encoding of vLLM's KVEventBatch: array_like batch, tagged-map events.
    return msgpack.packb([ts, events, 0])


def block_stored(tokens: list[int], hashes: list[int]) -> dict:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": tokens,
        "block_size": BLOCK,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }


async def complete(session: aiohttp.ClientSession, base_url: str, prompt: list[int]) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": False}
    async with session.post(f"{base_url}/v1/completions", json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, text


async def send_repeats(
    session: aiohttp.ClientSession, stack: Stack, prefixes: list[list[int]], ports: list[int]
) -> dict[int, int]:
    """Each prefix REPEATS times (distinct tails), one request at a time; count per worker."""
    served = dict.fromkeys(ports, 0)
    for k, prefix in enumerate(prefixes):
        for r in range(REPEATS):
            before = {p: requests_total(p) for p in ports}
            await complete(session, stack.frontend.base_url, [*prefix, 900 + k, 950 + r])
            after = {p: requests_total(p) for p in ports}
            hit = [p for p in ports if after[p] > before[p]]
            assert len(hit) == 1, (before, after)
            served[hit[0]] += 1
    return served


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout}s")
        time.sleep(0.1)


@pytest.mark.e2e
async def test_vllm_kv_events_over_zmq_steer_repeated_prefixes(make_stack) -> None:
    stack: Stack = make_stack("file", "tcp", router_mode="kv")  # event plane: 1.6.1's default
    rng = random.Random(13)
    ctx = zmq.Context()
    engine = ctx.socket(zmq.XPUB)  # PUB on the wire; XPUB also reports the subscription
    engine_port = engine.bind_to_random_port("tcp://127.0.0.1")
    try:
        port_a, port_b = free_port(), free_port()
        module = "tests.zmq_kv_engine"
        endpoint = f"tcp://127.0.0.1:{engine_port}"
        a = stack.start_worker(
            MODEL, "--kv-events-endpoint", endpoint, module=module, system_port=port_a
        )
        b = stack.start_worker(MODEL, module=module, system_port=port_b)
        stack.frontend.wait_for_model(MODEL, timeout=60, watch=[a, b])
        instances = stack.frontend.file_kv / "v1" / "instances"
        wait_until(lambda: len(list(instances.rglob("*"))) >= 2, 30, "two workers registered")
        assert engine.poll(30_000), "worker A never subscribed to the engine's KV socket"
        engine.recv()
        # Worker A's channels are on the ZMQ event plane, advertised (and bound) on loopback.
        channels = [
            json.loads(f.read_text())
            for f in (stack.frontend.file_kv / "v1" / "event_channels").rglob("*")
            if f.is_file()
        ]
        assert {c["topic"] for c in channels} == {"kv-events", "kv_metrics"}
        for c in channels:
            assert c["transport"]["kind"] == "Zmq"
            assert c["transport"]["config"]["endpoint"].startswith("tcp://127.0.0.1:")
        await asyncio.sleep(2.0)  # the frontend discovers the second worker and its channels

        def prefix() -> list[int]:
            return [rng.randrange(10, 880) for _ in range(PREFIX_BLOCKS * BLOCK)]

        async with aiohttp.ClientSession() as session:
            # Control: repeated prefixes, no events.
            control = await send_repeats(
                session, stack, [prefix() for _ in range(CONTROL_PREFIXES)], [port_a, port_b]
            )
            # The engine (vLLM format) reports that A holds these prefixes.
            held = [prefix() for _ in range(PREFIXES)]
            for seq, tokens in enumerate(held):
                hashes = [rng.getrandbits(64) for _ in range(PREFIX_BLOCKS)]
                payload = vllm_batch([block_stored(tokens, hashes)], time.time())
                engine.send_multipart([b"", seq.to_bytes(8, "big"), payload])
            accepted = 'stage="accepted"'
            wait_until(
                lambda: (
                    metric_sum(
                        scrape(port_a), "dynamo_component_kv_publisher_zmq_events_total", accepted
                    )
                    >= PREFIXES
                ),
                30,
                "worker A did not relay the stored events",
            )
            # Worker A's ZMQ event plane -> the frontend's KV indexer: milliseconds on loopback;
            # the frontend exposes no count of applied events to wait on.
            await asyncio.sleep(2.0)
            with_events = await send_repeats(session, stack, held, [port_a, port_b])
    finally:
        engine.close(linger=0)
        ctx.term()

    print(f"\ncontrol (no events): A={control[port_a]} B={control[port_b]}")
    print(f"with vLLM events for A's prefixes: A={with_events[port_a]} B={with_events[port_b]}")
    assert control[port_a] > 0 and control[port_b] > 0, f"control run not spread: {control}"
    assert with_events == {port_a: PREFIXES * REPEATS, port_b: 0}, with_events
