"""Survival of etcd and NATS outages under load, through the real Dynamo 1.6.1 frontend.

Each test owns its etcd / nats-server (127.0.0.1, fixed port so a restart reuses it) and
stops it at the end. The outages last as long as the issue asks (20 s):

* etcd stopped 20 s under load, with a lease TTL of 3 s: the outage is more than six TTLs,
  so a lease that etcd did not restore from its data directory would be gone. Then etcd
  frozen (SIGSTOP) 5 s, which makes the lease expire for certain (a frozen leader keeps its
  clock), to exercise re-registration.
* NATS stopped 20 s on the NATS request plane, with streams in flight and new requests sent
  during the outage (each bounded by the client's 15 s timeout).
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import Stack, wait_until
from test_e2e_serving import words

from backend_common.devstack.frontend import Frontend
from backend_common.devstack.openai import ChatResult, chat
from backend_common.devstack.services import EtcdServer, NatsServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

NEW_REQUEST_BOUND_S = 15.0  # client timeout of every request sent during a NATS outage
ETCD_DOWN_S = 20.0
NATS_DOWN_S = 20.0


async def load(base: str, model: str, stop: asyncio.Event, out: list, clients: int = 4) -> None:
    """``clients`` loops of short streaming requests until ``stop``; results into ``out``."""

    async def loop(session: aiohttp.ClientSession) -> None:
        for _ in range(10_000):  # bounded; ends when `stop` is set
            if stop.is_set():
                return
            t0 = time.monotonic()
            try:
                out.append(await chat(session, base, model, "w1", max_tokens=8, stream=True))
            except Exception as exc:  # noqa: BLE001 - reported as a failure
                out.append((t0, exc))
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(loop(session) for _ in range(clients)))


def make_own_stack(tmp_path: Path, tiny_model: Path, python: str, **kw) -> Stack:
    workdir = tmp_path / "stack"
    frontend = Frontend(workdir=workdir, python=python, **kw)
    return Stack(
        frontend,
        discovery=kw["discovery_backend"],
        plane=kw.get("request_plane", "tcp"),
        etcd_endpoint=kw.get("etcd_endpoint"),
        nats_url=kw.get("nats_url"),
        workdir=workdir,
        model_dir=tiny_model,
    )


def serving_ids(proc) -> list[str]:
    text = proc.log_path.read_text()
    return re.findall(r"instance ([0-9a-f]+)\)$", text, re.M) + re.findall(
        r"re-registering as instance ([0-9a-f]+)", text
    )


async def test_etcd_outage_under_load(tmp_path: Path, tiny_model: Path, frontend_python: str):
    etcd = EtcdServer(tmp_path / "etcd")
    etcd.start()
    stack = make_own_stack(
        tmp_path,
        tiny_model,
        frontend_python,
        discovery_backend="etcd",
        etcd_endpoint=etcd.endpoint,
    )
    try:
        stack.frontend.start()
        proc = stack.serve("tiny-etcd", env={"ETCD_LEASE_TTL": "3"})
        first_id = serving_ids(proc)[0]
        results: list = []
        stop = asyncio.Event()
        loader = asyncio.create_task(load(stack.frontend.base_url, "tiny-etcd", stop, results))
        await asyncio.sleep(1)
        # Phase 1: etcd stopped for 20 s (> 6 TTLs).
        await asyncio.to_thread(etcd.stop)
        await asyncio.sleep(ETCD_DOWN_S)
        await asyncio.to_thread(etcd.start)
        await asyncio.sleep(2)
        phase1 = list(results)
        ids_after_restart = serving_ids(proc)
        # Phase 2: etcd frozen for 5 s: the lease expires on resume; the worker re-registers.
        etcd._proc.send_signal(signal.SIGSTOP)  # noqa: SLF001 - our own child process
        await asyncio.sleep(5)
        etcd._proc.send_signal(signal.SIGCONT)  # noqa: SLF001
        resumed = time.monotonic()
        await asyncio.to_thread(
            wait_until, lambda: len(serving_ids(proc)) > len(ids_after_restart), 10
        )
        reregistered_s = time.monotonic() - resumed
        new_id = serving_ids(proc)[-1]

        def routed() -> bool:
            body = stack.frontend.health() or {}
            return any(
                f"{int(i.get('instance_id', 0)):x}" == new_id for i in body.get("instances") or []
            )

        await asyncio.to_thread(wait_until, routed, 10)
        routed_s = time.monotonic() - resumed
        await asyncio.sleep(1)
        stop.set()
        await asyncio.wait_for(loader, 30)
        async with aiohttp.ClientSession() as s:
            final = await chat(
                s, stack.frontend.base_url, "tiny-etcd", "w1", max_tokens=3, stream=True
            )
    finally:
        etcd._proc.send_signal(signal.SIGCONT) if etcd.running else None  # noqa: SLF001
        stack.stop()
        etcd.stop()

    def ok(r) -> bool:
        return isinstance(r, ChatResult) and r.ok and r.finish_reason == "length"

    phase2 = results[len(phase1) :]
    print(
        f"etcd: phase 1 (stopped {ETCD_DOWN_S:.0f} s): {len(phase1)} requests, "
        f"{sum(not ok(r) for r in phase1)} failed, "
        f"instance kept: {ids_after_restart == [first_id]}; "
        f"phase 2 (frozen 5 s): {len(phase2)} requests, {sum(not ok(r) for r in phase2)} failed; "
        f"re-registered {reregistered_s:.2f} s and routed {routed_s:.2f} s after etcd resumed"
    )
    # Phase 1: no failed request; etcd restored the lease, so nothing re-registered.
    assert phase1 and all(ok(r) for r in phase1), [r for r in phase1 if not ok(r)][:3]
    assert ids_after_restart == [first_id]
    # Phase 2: re-registered under a new id, and the frontend routes to it again.
    assert new_id != first_id
    assert ok(final) and final.text.strip() == words(3).strip()


async def test_nats_outage_on_nats_request_plane(
    tmp_path: Path, tiny_model: Path, frontend_python: str
):
    nats = NatsServer(log_path=tmp_path / "nats.log")
    nats.start()
    stack = make_own_stack(
        tmp_path,
        tiny_model,
        frontend_python,
        discovery_backend="file",
        nats_url=nats.url,
        request_plane="nats",
    )
    try:
        stack.frontend.start()
        proc = stack.serve("tiny-nats", "--delay", "0.01")
        base = stack.frontend.base_url
        async with aiohttp.ClientSession() as s:
            # In-flight streams (~4 s) started before the outage.
            inflight = [
                asyncio.create_task(chat(s, base, "tiny-nats", "w1", max_tokens=400, stream=True))
                for _ in range(4)
            ]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(nats.stop)
            t_down = time.monotonic()

            async def new_request() -> tuple[float, object]:
                t0 = time.monotonic()
                try:
                    r: object = await chat(
                        s,
                        base,
                        "tiny-nats",
                        "w1",
                        max_tokens=4,
                        stream=True,
                        timeout=NEW_REQUEST_BOUND_S,
                    )
                except TimeoutError as exc:
                    r = exc
                return time.monotonic() - t0, r

            # New requests at the start and in the middle of the outage (4 each).
            during = [asyncio.create_task(new_request()) for _ in range(4)]
            await asyncio.sleep(NATS_DOWN_S / 2 - (time.monotonic() - t_down))
            during += [asyncio.create_task(new_request()) for _ in range(4)]
            await asyncio.sleep(NATS_DOWN_S - (time.monotonic() - t_down))
            await asyncio.to_thread(nats.start)
            t_up = time.monotonic()
            streams = await asyncio.gather(*inflight)
            during_r = await asyncio.gather(*during)
            # After the restart: new requests succeed once both sides reconnected (bounded).
            after: ChatResult | None = None
            for _ in range(40):
                after = await chat(s, base, "tiny-nats", "w1", max_tokens=4, stream=True, timeout=5)
                if after.ok:
                    break
                await asyncio.sleep(0.25)
            recovered_s = time.monotonic() - t_up
        assert proc.running
    finally:
        stack.stop()
        nats.stop()

    print(
        "nats: in-flight "
        + str([(r.status, r.finish_reason) for r in streams])
        + "; during outage "
        + str([(round(t, 2), getattr(r, "status", repr(r))) for t, r in during_r])
        + f"; served again {recovered_s:.2f} s after NATS restarted"
    )
    for r in streams:
        assert r.ok and r.finish_reason == "length" and r.text.strip() == words(400).strip()
    for elapsed, _r in during_r:
        assert elapsed < NEW_REQUEST_BOUND_S + 1
    assert after is not None and after.ok and after.text.strip() == words(4).strip()
