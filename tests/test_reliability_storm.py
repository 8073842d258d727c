"""Cancellation storm: 500 streaming requests whose clients disconnect at random points,
through the real Dynamo 1.6.1 frontend (~15 s on 2 cores, 50 at a time).

Afterwards the worker must be back to its idle state: nothing in flight
(``dynamo_component_inflight_requests``), every engine guard released, ``abort`` called
exactly once per request that was cancelled and never for one that finished, and no
growth of asyncio tasks or RSS beyond the bounds below (measured through gauges that
``tests.e2e_engine`` exports).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiohttp
import pytest
from conftest import Stack, free_port, wait_until
from test_e2e_serving import events, scrape

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REQUESTS = 500
CONCURRENCY = 50
TASK_GROWTH_BOUND = 5
RSS_GROWTH_BOUND = 32 * 2**20


async def one(session: aiohttp.ClientSession, url: str, rng: random.Random) -> str:
    """One request, abandoned after a random number of chunks (0 = right after the headers)."""
    body = {
        "model": "tiny-storm",
        "messages": [{"role": "user", "content": "w1 w2"}],
        "max_tokens": 60,
        "stream": True,
    }
    leave_after = rng.choice([0, 1, 2, 5, 10, 30, 1000])  # 1000: read to the end
    timeout = aiohttp.ClientTimeout(total=30)
    async with session.post(url, json=body, timeout=timeout) as resp:
        assert resp.status == 200, resp.status
        if leave_after == 0:
            return "left-at-headers"
        seen = 0
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                return "finished"
            if line.startswith(b"data: {"):
                seen += 1
                if seen >= leave_after:
                    return "left-mid-stream"
    return "finished"


async def test_cancellation_storm_leaves_nothing_behind(make_stack) -> None:
    stack: Stack = make_stack("file", "tcp")
    port = free_port()
    proc = stack.serve("tiny-storm", "--delay", "0.005", system_port=port)
    url = f"{stack.frontend.base_url}/v1/chat/completions"
    rng = random.Random(1234)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm-up, so that lazily created state (pools, caches) is in the baseline.
        await asyncio.gather(*(one(session, url, random.Random(i)) for i in range(20)))
        wait_until(lambda: scrape(port)["dynamo_component_inflight_requests"] == 0, 10)
        before = scrape(port)
        released_before = len(events(proc, "release"))

        sem = asyncio.Semaphore(CONCURRENCY)

        async def limited() -> str:
            async with sem:
                return await one(session, url, rng)

        outcomes = Counter(await asyncio.gather(*(limited() for _ in range(REQUESTS))))

    await asyncio.to_thread(
        wait_until, lambda: scrape(port)["dynamo_component_inflight_requests"] == 0, 15
    )
    await asyncio.to_thread(wait_until, lambda: scrape(port)["e2e_engine_guarded_requests"] == 0, 5)
    after = scrape(port)
    aborts = events(proc, "abort")
    releases = events(proc, "release")
    print(
        f"storm: {dict(outcomes)}; aborts {len(aborts)}; releases "
        f"{len(releases) - released_before}; tasks {before['e2e_engine_asyncio_tasks']:.0f} -> "
        f"{after['e2e_engine_asyncio_tasks']:.0f}; rss {before['e2e_engine_rss_bytes'] / 2**20:.1f}"
        f" -> {after['e2e_engine_rss_bytes'] / 2**20:.1f} MiB"
    )
    assert outcomes["left-mid-stream"] > 100 and outcomes["finished"] > 20
    # abort() at most once per request, and only for requests whose guard was taken.
    assert len(aborts) == len(set(aborts))
    assert set(aborts) <= set(releases)
    # Every request that left mid-stream was cancelled in the engine (more may have been:
    # a client leaving right after the headers can still reach the worker).
    assert len(aborts) >= outcomes["left-mid-stream"]
    # Every request that reached the engine released its guard exactly once.
    assert len(releases) == len(set(releases))
    assert len(releases) - released_before >= outcomes["left-mid-stream"] + outcomes["finished"]
    assert after["e2e_engine_asyncio_tasks"] <= before["e2e_engine_asyncio_tasks"] + (
        TASK_GROWTH_BOUND
    )
    assert after["e2e_engine_rss_bytes"] <= before["e2e_engine_rss_bytes"] + RSS_GROWTH_BOUND
    assert proc.running
