"""The health canary: payload precedence, the ``_HEALTH_CHECK`` marker, and ``/health``.

Precedence (Dynamo's): the operator override (``--health-check-payload``, whose default is
``DYN_HEALTH_CHECK_PAYLOAD``, both read by ``args.py``) > ``engine.health_check_payload()``;
the winner is stamped ``_HEALTH_CHECK: true``; an invalid operator payload disables the
canary. A worker whose engine fails the canary reports 503 on its status server's
``/health``, and 200 again once the canary passes.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from inproc_worker import file_config, running_worker

from backend_common import GenerateContext, LLMEngineOutput, PreprocessedRequest
from backend_common.args import add_common_args, worker_config_from_args
from backend_common.errors import unknown
from backend_common.reference import ReferenceEngine
from backend_common.runtime.health import (
    build_health_check_payload,
    resolve_health_check_payload,
)

ENGINE_PAYLOAD = {"token_ids": [3], "stop_conditions": {"max_tokens": 1}}


class CanaryEngine(ReferenceEngine):
    """Records every probe it sees; fails probes while ``failing`` is set."""

    def __init__(self, payload: dict[str, Any] | None = ENGINE_PAYLOAD) -> None:
        super().__init__("canary-model")
        self.payload = payload
        self.failing = False
        self.probes: list[PreprocessedRequest] = []

    async def health_check_payload(self) -> dict[str, Any] | None:
        return self.payload

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if request.is_probe:
            self.probes.append(request)
            if self.failing:
                raise unknown("simulated device failure")
        async for item in super().generate(request, ctx):
            yield item


# -- precedence ------------------------------------------------------------------------------
async def test_engine_payload_is_used_and_stamped(monkeypatch) -> None:
    monkeypatch.delenv("DYN_HEALTH_CHECK_PAYLOAD", raising=False)
    payload = await resolve_health_check_payload(None, CanaryEngine())
    assert payload == {**ENGINE_PAYLOAD, "_HEALTH_CHECK": True}


async def test_env_beats_engine_and_override_beats_env(monkeypatch) -> None:
    monkeypatch.setenv("DYN_HEALTH_CHECK_PAYLOAD", '{"token_ids": [9], "_HEALTH_CHECK": false}')
    config = worker_config_from_args(add_common_args(argparse.ArgumentParser()).parse_args([]))
    from_env = await resolve_health_check_payload(config.health_check_payload, CanaryEngine())
    assert from_env == {"token_ids": [9], "_HEALTH_CHECK": True}  # marker forced on
    override = await resolve_health_check_payload({"token_ids": [4]}, CanaryEngine())
    assert override == {"token_ids": [4], "_HEALTH_CHECK": True}
    # An operator's empty object replaces the engine's payload entirely.
    assert await resolve_health_check_payload({}, CanaryEngine()) == {"_HEALTH_CHECK": True}


async def test_flag_beats_env_through_the_cli(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DYN_HEALTH_CHECK_PAYLOAD", '{"token_ids": [9]}')
    parser = add_common_args(argparse.ArgumentParser())
    from_env = worker_config_from_args(parser.parse_args([]))
    assert from_env.health_check_payload == {"token_ids": [9], "_HEALTH_CHECK": True}
    f = tmp_path / "canary.json"
    f.write_text('{"token_ids": [5]}')
    parser = add_common_args(argparse.ArgumentParser())
    flagged = worker_config_from_args(parser.parse_args(["--health-check-payload", f"@{f}"]))
    assert flagged.health_check_payload == {"token_ids": [5], "_HEALTH_CHECK": True}


async def test_invalid_operator_payload_falls_back_to_the_engine(
    monkeypatch, tmp_path, caplog
) -> None:
    engine_payload = {**ENGINE_PAYLOAD, "_HEALTH_CHECK": True}
    for raw in ("[1, 2]", "{not json"):
        monkeypatch.setenv("DYN_HEALTH_CHECK_PAYLOAD", raw)
        config = worker_config_from_args(add_common_args(argparse.ArgumentParser()).parse_args([]))
        assert config.health_check_payload is None  # dropped by args.py, with a warning
    assert "health check payload" in caplog.text
    monkeypatch.delenv("DYN_HEALTH_CHECK_PAYLOAD")
    # The worker then uses the engine's payload.
    engine = CanaryEngine()
    async with running_worker(engine, file_config(tmp_path, health_check_payload=None)) as (
        worker,
        _base,
    ):
        assert worker.health.payload == engine_payload
    # An override built in code that is not an object: a warning, then the engine's payload.
    override = ["not", "an", "object"]
    assert await resolve_health_check_payload(override, CanaryEngine()) == engine_payload  # type: ignore[arg-type]
    assert "using the engine's health_check_payload()" in caplog.text


async def test_invalid_engine_payload_disables_the_canary(monkeypatch) -> None:
    monkeypatch.delenv("DYN_HEALTH_CHECK_PAYLOAD", raising=False)
    assert await resolve_health_check_payload(None, CanaryEngine(payload=[1])) is None  # type: ignore[arg-type]


def test_build_health_check_payload() -> None:
    payload = build_health_check_payload(7, extras={"sampling_options": {"seed": 1}})
    assert payload["token_ids"] == [7] and payload["_HEALTH_CHECK"] is True
    assert payload["stop_conditions"] == {"max_tokens": 1, "ignore_eos": True}
    assert payload["sampling_options"] == {"seed": 1}
    assert PreprocessedRequest.from_dict(payload).is_probe


# -- /health on a running worker -------------------------------------------------------------
async def get_health(base: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=15)) as r:
            return r.status, await r.json()


async def test_health_reports_unhealthy_while_the_canary_fails(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("DYN_HEALTH_CHECK_PAYLOAD", raising=False)
    engine = CanaryEngine()
    async with running_worker(engine, file_config(tmp_path)) as (_worker, base):
        status, body = await get_health(base)
        assert status == 200, body
        assert body["status"] == "healthy"

        engine.failing = True
        status, body = await get_health(base)
        assert status == 503, body
        assert body["status"] == "unhealthy"
        assert "simulated device failure" in body["canary"]

        engine.failing = False
        status, _ = await get_health(base)
        assert status == 200
    # Every canary was the engine's payload, marked as a probe.
    assert len(engine.probes) == 3
    assert all(p.is_probe and p.token_ids == [3] for p in engine.probes)


async def test_override_payload_reaches_the_engine(monkeypatch, tmp_path) -> None:
    engine = CanaryEngine()
    config = file_config(tmp_path, health_check_payload={"token_ids": [8, 9]})
    async with running_worker(engine, config) as (_worker, base):
        status, _ = await get_health(base)
        assert status == 200
    assert [p.token_ids for p in engine.probes] == [[8, 9]]


@pytest.mark.parametrize("payload", [None])
async def test_no_canary_means_healthy_while_serving(monkeypatch, tmp_path, payload) -> None:
    monkeypatch.delenv("DYN_HEALTH_CHECK_PAYLOAD", raising=False)
    engine = CanaryEngine(payload=payload)
    async with running_worker(engine, file_config(tmp_path)) as (_worker, base):
        status, body = await get_health(base)
    assert status == 200 and body["canary"] == "disabled"
    assert engine.probes == []


# -- the canary on an idle worker (DYN_HEALTH_CHECK_ENABLED) -----------------------------------
async def test_idle_canary_runs_only_while_no_request_arrives() -> None:
    import time

    from backend_common.runtime.health import IdleCanary

    probes: list[float] = []
    activity = [0.0]

    async def probe(timeout: float) -> tuple[bool, str]:
        probes.append(time.monotonic())
        return True, "ok"

    canary = IdleCanary(probe, lambda: activity[0], wait_s=0.2, timeout_s=1.0)
    canary.start()
    try:
        # Busy for 1 s: a request every 50 ms keeps the worker from being idle.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            activity[0] = time.monotonic()
            await asyncio.sleep(0.05)
        assert probes == []
        await asyncio.sleep(1.0)  # idle: a canary every ~0.2 s
    finally:
        await canary.close()
    assert 3 <= len(probes) <= 6, probes
    assert all(b - a >= 0.19 for a, b in zip(probes, probes[1:], strict=False))
    assert canary.last is not None and canary.last.ok


async def test_enabled_canary_runs_by_itself_and_health_reports_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", "0")
    monkeypatch.delenv("DYN_HEALTH_CHECK_PAYLOAD", raising=False)
    engine = CanaryEngine()
    config = file_config(tmp_path, health_check_enabled=True, canary_wait_time=0.2)
    async with running_worker(engine, config) as (_worker, base):
        await asyncio.sleep(0.8)
        ran = len(engine.probes)
        assert ran >= 2, ran  # nobody polled /health: the worker ran them itself
        status, body = await get_health(base)
        assert status == 200 and body["canary"] == "ok", body
        engine.failing = True
        await asyncio.sleep(0.6)
        status, body = await get_health(base)
        assert status == 503 and "simulated device failure" in body["canary"], body
        engine.failing = False
        await asyncio.sleep(0.6)
        status, body = await get_health(base)
        assert status == 200, body


# -- readiness: registered, and not draining ---------------------------------------------------
async def test_health_is_not_ready_until_registered_nor_once_draining(
    monkeypatch, tmp_path
) -> None:
    """The rule discovery that follows ``/health`` relies on (docs/architecture.md#lifecycle)."""
    from backend_common.runtime.worker import Worker

    monkeypatch.delenv("DYN_HEALTH_CHECK_PAYLOAD", raising=False)
    gate = asyncio.Event()
    registering = asyncio.Event()
    register = Worker._register

    async def held_register(self: Worker) -> None:
        registering.set()
        await asyncio.wait_for(gate.wait(), 10)
        await register(self)

    monkeypatch.setattr(Worker, "_register", held_register)
    # A grace period long enough to look at /health while the worker drains.
    config = file_config(tmp_path, graceful_shutdown_grace_period=1.0)
    worker = Worker(CanaryEngine(payload=None), config)
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        await asyncio.wait_for(registering.wait(), 10)
        status = worker._services.status
        assert status is not None  # the status server is up before the records go out
        code, body = await get_health(status.base_url)
        assert code == 503 and body == {"status": "notready", "state": "starting"}, body
        gate.set()
        while not worker.lifecycle.serving:
            assert not task.done()
            await asyncio.sleep(0.01)
        code, body = await get_health(status.base_url)
        assert code == 200 and body["status"] == "healthy", body
        worker.request_shutdown()  # draining starts now; the grace period keeps it running
        code, body = await get_health(status.base_url)
        assert code == 503 and body == {"status": "notready", "state": "draining"}, body
    finally:
        gate.set()
        if not worker.lifecycle.leaving:
            worker.request_shutdown()
        worker.request_shutdown()  # second signal: skip the remaining waits
        assert await asyncio.wait_for(task, 15) == 0
