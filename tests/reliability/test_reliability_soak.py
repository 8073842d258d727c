"""Soak: one worker under 16 streaming clients through the real Dynamo 1.6.1 frontend.

``make test`` runs 60 s; ``make soak`` runs 10 minutes (``RELIABILITY_SOAK_S=600``). Every
5 s the worker's RSS and open file descriptors are read from /proc and its asyncio task count
from the ``e2e_engine_asyncio_tasks`` gauge (``tests.e2e_engine`` exports it on /metrics).

Asserted: 0 failed requests (every one HTTP 200, ``finish_reason`` ``length``, full text);
RSS growth after the warm-up below 5 % (first sample after the warm-up against the last);
at idle after the load, open fds and asyncio tasks back to their idle values before it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import Stack, free_port, wait_until
from reliability_results import record
from worker_probes import scrape, words

from backend_common.devstack.openai import ChatResult, chat

SOAK_S = float(os.environ.get("RELIABILITY_SOAK_S", "60"))
SAMPLE_S = 5.0
CLIENTS = 16
TOKENS = 40
WARMUP_S = min(60.0, max(15.0, SOAK_S / 10))
RSS_GROWTH_BOUND = 0.05
FD_SLACK = 2  # idle fds may differ by a pooled connection or two, never by a leak's worth

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(int(SOAK_S) + 180)]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_soak(make_stack) -> None:
    stack: Stack = make_stack("file", "tcp")
    port = free_port()
    model = "tiny-soak"
    proc = stack.serve(model, "--delay", "0.005", system_port=port)
    pid = proc.pid
    assert pid is not None
    base = stack.frontend.base_url
    expected = words(TOKENS).strip()
    results: list[ChatResult] = []
    errors: list[str] = []
    samples: list[dict[str, float]] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(1_000_000):  # bounded; ends when `stop` is set
            if stop.is_set():
                return
            try:
                results.append(
                    await chat(
                        session, base, model, "w1", max_tokens=TOKENS, stream=True, timeout=30
                    )
                )
            except Exception as exc:  # noqa: BLE001 - a client-visible failure, reported
                errors.append(repr(exc))

    def idle() -> dict[str, float]:
        wait_until(lambda: scrape(port)["dynamo_component_inflight_requests"] == 0, 15)
        return {"fds": open_fds(pid), "tasks": scrape(port)["e2e_engine_asyncio_tasks"]}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
        # A short burst first, so that pools and caches are part of the idle baseline.
        await asyncio.gather(
            *(chat(session, base, model, "w1", max_tokens=4, stream=True) for _ in range(32))
        )
        idle_before = await asyncio.to_thread(idle)
        t0 = time.monotonic()
        clients = [asyncio.create_task(client(session)) for _ in range(CLIENTS)]
        try:
            for i in range(1, int(SOAK_S / SAMPLE_S) + 1):
                await asyncio.sleep(max(0.0, t0 + i * SAMPLE_S - time.monotonic()))
                metrics = await asyncio.to_thread(scrape, port)
                samples.append(
                    {
                        "t": round(time.monotonic() - t0, 1),
                        "rss_mib": round(rss_bytes(pid) / 2**20, 2),
                        "fds": open_fds(pid),
                        "tasks": metrics["e2e_engine_asyncio_tasks"],
                        "requests": len(results),
                    }
                )
                assert proc.running, proc.log_tail()
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), 60)
        elapsed = time.monotonic() - t0
        idle_after = await asyncio.to_thread(idle)
        # Tasks that end a moment after their request (call-home writers) get a short while.
        for _ in range(50):
            if idle_after["tasks"] <= idle_before["tasks"]:
                break
            await asyncio.sleep(0.1)
            idle_after = await asyncio.to_thread(idle)

    failed = [
        r
        for r in results
        if not (r.ok and r.finish_reason == "length" and r.text.strip() == expected)
    ]
    after_warmup = [s for s in samples if s["t"] >= WARMUP_S]
    base_rss, last_rss = after_warmup[0]["rss_mib"], after_warmup[-1]["rss_mib"]
    growth = last_rss / base_rss - 1
    name = "soak" if SOAK_S <= 60 else f"soak_{int(SOAK_S)}s"
    record(
        name,
        title=f"Soak {SOAK_S:.0f} s, {CLIENTS} streaming clients, one worker, samples every "
        f"{SAMPLE_S:.0f} s",
        order=90 if SOAK_S <= 60 else 91,
        bounds=[
            "0 failed requests",
            f"RSS growth after {WARMUP_S:.0f} s warm-up < {RSS_GROWTH_BOUND:.0%}",
            f"idle fds after <= before + {FD_SLACK}",
            "idle asyncio tasks after <= before",
        ],
        summary=(
            f"{len(results)} requests ({len(results) / elapsed:.0f}/s), {len(failed)} failed, "
            f"{len(errors)} client errors; RSS {base_rss:.1f} -> {last_rss:.1f} MiB "
            f"({growth:+.1%}) after warm-up; fds at idle {idle_before['fds']} -> "
            f"{idle_after['fds']} (under load {min(s['fds'] for s in samples)}-"
            f"{max(s['fds'] for s in samples)}); tasks at idle {idle_before['tasks']:.0f} -> "
            f"{idle_after['tasks']:.0f}"
        ),
        measured={
            "duration_s": round(elapsed, 1),
            "requests": len(results),
            "failed": len(failed),
            "client_errors": errors[:5],
            "rss_growth": round(growth, 4),
            "idle_before": idle_before,
            "idle_after": idle_after,
            "samples": samples,
        },
    )
    assert not errors, errors[:5]
    assert not failed, [(r.status, r.finish_reason, r.error) for r in failed[:5]]
    assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth:+.1%} after warm-up: {samples}"
    assert idle_after["fds"] <= idle_before["fds"] + FD_SLACK, (idle_before, idle_after)
    assert idle_after["tasks"] <= idle_before["tasks"], (idle_before, idle_after)
