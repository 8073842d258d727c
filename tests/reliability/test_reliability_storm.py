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
import json
import random
import time
from collections import Counter

import aiohttp
import pytest
from conftest import Stack, free_port, wait_until
from reliability_results import record
from worker_probes import events, scrape

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REQUESTS = 500
CONCURRENCY = 50
TASK_GROWTH_BOUND = 5
RSS_GROWTH_BOUND = 32 * 2**20


async def one(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    """One request, abandoned after a random number of chunks (0 = right after the headers).

    Returns (outcome, the response id without its ``chatcmpl-`` prefix, "" when no chunk
    was read): the frontend uses that id as the request id the engine sees.
    """
    body = {
        "model": "tiny-storm",
        "messages": [{"role": "user", "content": "w1 w2"}],
        "max_tokens": 60,
        "stream": True,
    }
    leave_after = rng.choice([0, 1, 2, 5, 10, 30, 1000])  # 1000: read to the end
    timeout = aiohttp.ClientTimeout(total=30)
    rid = ""
    async with session.post(url, json=body, timeout=timeout) as resp:
        assert resp.status == 200, resp.status
        if leave_after == 0:
            return "left-at-headers", rid
        seen = 0
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                return "finished", rid
            if line.startswith(b"data: {"):
                rid = rid or json.loads(line[6:])["id"].removeprefix("chatcmpl-")
                seen += 1
                if seen >= leave_after:
                    return "left-mid-stream", rid
    return "finished", rid


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
        aborted_before = len(events(proc, "abort"))

        sem = asyncio.Semaphore(CONCURRENCY)

        async def limited() -> tuple[str, str]:
            async with sem:
                return await one(session, url, rng)

        t0 = time.monotonic()
        done = await asyncio.gather(*(limited() for _ in range(REQUESTS)))
        elapsed = time.monotonic() - t0
    outcomes = Counter(outcome for outcome, _ in done)
    finished_ids = {rid for outcome, rid in done if outcome == "finished"}

    await asyncio.to_thread(
        wait_until, lambda: scrape(port)["dynamo_component_inflight_requests"] == 0, 15
    )
    await asyncio.to_thread(wait_until, lambda: scrape(port)["e2e_engine_guarded_requests"] == 0, 5)
    after = scrape(port)
    # Warm-up excluded: only what the 500 storm requests caused.
    aborts = events(proc, "abort")[aborted_before:]
    releases = events(proc, "release")[released_before:]
    engine_finished = set(events(proc, "finish"))
    left_ids = {rid for outcome, rid in done if outcome == "left-mid-stream"}
    # A client that left mid-stream may still have let the engine finish first (the
    # disconnect reaches the worker later): such a request needs no abort.
    aborted_finished = (finished_ids | engine_finished) & set(aborts)
    left_unaccounted = left_ids - set(aborts) - engine_finished
    tasks = (before["e2e_engine_asyncio_tasks"], after["e2e_engine_asyncio_tasks"])
    rss = (before["e2e_engine_rss_bytes"] / 2**20, after["e2e_engine_rss_bytes"] / 2**20)
    record(
        "cancellation_storm",
        title=f"Cancellation storm, {REQUESTS} requests, {CONCURRENCY} at a time",
        order=70,
        bounds=[
            "inflight 0 and every guard released afterwards",
            "abort <= 1 per request, 0 for requests the engine finished; every request left "
            "mid-stream either aborted or finished by the engine",
            "one release per request that reached the engine",
            f"asyncio tasks +<= {TASK_GROWTH_BOUND}",
            f"RSS +<= {RSS_GROWTH_BOUND // 2**20} MiB",
        ],
        summary=(
            f"{outcomes['left-mid-stream']} left mid-stream, {outcomes['left-at-headers']} at "
            f"headers, {outcomes['finished']} finished; {len(aborts)} aborts (warm-up excluded; "
            f"{len(aborts) - len(set(aborts))} duplicates, {len(aborted_finished)} for finished "
            f"requests; {len(left_ids - set(aborts))} left mid-stream after the engine had "
            f"finished), {len(releases)} releases; tasks {tasks[0]:.0f} -> {tasks[1]:.0f}; "
            f"RSS {rss[0]:.1f} -> {rss[1]:.1f} MiB; {elapsed:.1f} s"
        ),
        measured={
            "outcomes": dict(outcomes),
            "aborts": len(aborts),
            "duplicate_aborts": len(aborts) - len(set(aborts)),
            "aborts_for_finished": len(aborted_finished),
            "left_after_engine_finished": len(left_ids - set(aborts)),
            "left_unaccounted": sorted(left_unaccounted)[:5],
            "releases": len(releases),
            "tasks": tasks,
            "rss_mib": [round(x, 1) for x in rss],
            "elapsed_s": round(elapsed, 2),
        },
    )
    assert outcomes["left-mid-stream"] > 100 and outcomes["finished"] > 20
    # The ids the client saw are the engine's request ids (else the checks below are void).
    assert finished_ids <= set(releases), "response ids do not match the engine's request ids"
    # abort() at most once per request, only for requests whose guard was taken, and never
    # for a request that finished.
    assert len(aborts) == len(set(aborts)), "duplicate aborts"
    assert set(aborts) <= set(releases)
    assert not aborted_finished, f"{len(aborted_finished)} finished requests were aborted"
    # Every request that left mid-stream was cancelled in the engine, unless the engine had
    # finished it already (more may have been: a client leaving right after the headers can
    # still reach the worker).
    assert not left_unaccounted, f"{len(left_unaccounted)} left mid-stream, never aborted"
    assert len(aborts) <= REQUESTS - outcomes["finished"]
    # Every request that reached the engine released its guard exactly once.
    assert len(releases) == len(set(releases))
    assert len(releases) >= outcomes["left-mid-stream"] + outcomes["finished"]
    assert tasks[1] <= tasks[0] + TASK_GROWTH_BOUND, tasks
    assert after["e2e_engine_rss_bytes"] <= before["e2e_engine_rss_bytes"] + RSS_GROWTH_BOUND, rss
    assert proc.running
