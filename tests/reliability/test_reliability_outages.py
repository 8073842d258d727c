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
from reliability_results import record
from worker_probes import words

from backend_common.devstack.frontend import Frontend
from backend_common.devstack.openai import ChatResult, chat
from backend_common.devstack.services import EtcdServer, NatsServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

NEW_REQUEST_BOUND_S = 15.0  # client timeout of every request sent during a NATS outage
ETCD_DOWN_S = 20.0
ETCD_FROZEN_S = 5.0
REREGISTER_BOUND_S = 2.0  # etcd back -> new lease and records written (keep-alive every ttl/3)
ROUTED_BOUND_S = 3.0  # etcd back -> the frontend lists the new instance
NATS_RECOVERY_BOUND_S = 10.0  # nats-server back -> a request served again
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
        await asyncio.sleep(ETCD_FROZEN_S)
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
    failed1 = [r for r in phase1 if not ok(r)]
    failed2 = [r for r in phase2 if not ok(r)]
    untyped2 = [r for r in failed2 if not (isinstance(r, ChatResult) and r.status in (404, 503))]
    record(
        "etcd_outage",
        title="etcd stopped 20 s, then frozen 5 s (lease TTL 3 s), 4 streaming clients",
        order=30,
        bounds=[
            "stopped: 0 failed requests, same instance id (etcd restores the lease)",
            f"frozen: re-registered <= {REREGISTER_BOUND_S:.0f} s and routed <= "
            f"{ROUTED_BOUND_S:.0f} s after etcd resumes",
            "failures while the expired keys are gone: HTTP 404/503 only",
        ],
        summary=(
            f"stopped {ETCD_DOWN_S:.0f} s: {len(phase1)} requests, {len(failed1)} failed, "
            f"instance kept: {ids_after_restart == [first_id]}; frozen {ETCD_FROZEN_S:.0f} s: "
            f"{len(phase2)} requests, {len(failed2)} failed "
            f"{sorted({getattr(r, 'status', 'exception') for r in failed2}, key=str)}; "
            f"re-registered {reregistered_s:.2f} s, routed {routed_s:.2f} s after etcd resumed"
        ),
        measured={
            "phase1_requests": len(phase1),
            "phase1_failed": len(failed1),
            "instance_kept": ids_after_restart == [first_id],
            "phase2_requests": len(phase2),
            "phase2_failed": len(failed2),
            "reregistered_s": round(reregistered_s, 3),
            "routed_s": round(routed_s, 3),
        },
    )
    # Phase 1: no failed request; etcd restored the lease, so nothing re-registered.
    assert phase1 and not failed1, failed1[:3]
    assert ids_after_restart == [first_id]
    # Phase 2: re-registered under a new id within the bound, and the frontend routes to it.
    assert new_id != first_id
    assert reregistered_s <= REREGISTER_BOUND_S, f"re-registered after {reregistered_s:.2f} s"
    assert routed_s <= ROUTED_BOUND_S, f"routed after {routed_s:.2f} s"
    assert not untyped2, untyped2[:3]
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
        proc_running = proc.running
    finally:
        stack.stop()
        nats.stop()

    during_s = [round(t, 2) for t, _ in during_r]
    during_status = [getattr(r, "status", type(r).__name__) for _, r in during_r]
    inflight_ok = sum(
        r.ok and r.finish_reason == "length" and r.text.strip() == words(400).strip()
        for r in streams
    )
    record(
        "nats_outage",
        title="NATS stopped 20 s, NATS request plane",
        order=40,
        bounds=[
            "in-flight streams finish",
            f"each request sent during the outage ends within {NEW_REQUEST_BOUND_S:.0f} + 1 s "
            "with HTTP 503",
            f"served again <= {NATS_RECOVERY_BOUND_S:.0f} s after nats-server restarts",
            "worker never exits",
        ],
        summary=(
            f"{inflight_ok}/4 in-flight 400-token streams finished; 8 sent during the outage: "
            f"{during_status} after {during_s} s; served again {recovered_s:.2f} s after the "
            f"restart"
        ),
        measured={
            "inflight_finished": inflight_ok,
            "during_s": during_s,
            "during_status": during_status,
            "recovered_s": round(recovered_s, 3),
            "worker_running": proc_running,
        },
    )
    assert proc_running
    assert inflight_ok == 4, [(r.status, r.finish_reason) for r in streams]
    for elapsed, r in during_r:
        assert elapsed < NEW_REQUEST_BOUND_S + 1
        assert getattr(r, "status", None) == 503, (elapsed, r)
    assert after is not None and after.ok and after.text.strip() == words(4).strip()
    assert recovered_s <= NATS_RECOVERY_BOUND_S, f"served again after {recovered_s:.2f} s"
