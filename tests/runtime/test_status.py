"""Status server (aiohttp) and framework metrics: routes, 503, metrics text, card files."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families

from backend_common.config import EngineConfig, WorkerConfig
from backend_common.devstack.tinymodel import write_tiny_model
from backend_common.runtime import status
from backend_common.runtime.metrics import WorkerMetrics
from backend_common.runtime.modelcard import build_model_card
from backend_common.runtime.status import StatusServer


def make_metrics() -> WorkerMetrics:
    return WorkerMetrics(
        namespace="dynamo",
        component="backend",
        endpoint="generate",
        model="org/model",
        model_name="served",
        extra_labels=[("team", "a")],
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


LABELS = tuple(
    sorted(
        {
            "dynamo_namespace": "dynamo",
            "dynamo_component": "backend",
            "dynamo_endpoint": "generate",
            "model": "org/model",
            "model_name": "served",
            "team": "a",
        }.items()
    )
)


def test_worker_metrics_values() -> None:
    m = make_metrics()
    s = samples(m.render().decode())
    # Lifecycle gauges exist from the start (0 until set).
    for name in ("model_load_time_seconds", "drain_time_seconds", "cleanup_time_seconds"):
        assert s[(f"dynamo_component_{name}", LABELS)] == 0.0
    m.set_model_load_time(1.5)
    m.set_cleanup_time(0.25)
    m.request_started()
    m.request_started()
    m.request_finished(0.2)
    s = samples(m.render().decode())
    assert s[("dynamo_component_model_load_time_seconds", LABELS)] == 1.5
    assert s[("dynamo_component_cleanup_time_seconds", LABELS)] == 0.25
    assert s[("dynamo_component_inflight_requests", LABELS)] == 1
    assert s[("dynamo_component_requests_total", LABELS)] == 2
    assert s[("dynamo_component_request_duration_seconds_count", LABELS)] == 1
    assert s[("dynamo_component_request_duration_seconds_sum", LABELS)] == pytest.approx(0.2)
    text = m.render().decode()
    assert "# HELP dynamo_component_model_load_time_seconds Time engine.start() took" in text


def test_empty_label_values_are_left_out() -> None:
    m = WorkerMetrics(namespace="ns", component="c", endpoint="e", model="m", model_name="")
    s = samples(m.render().decode())
    labels = dict(next(k[1] for k in s if k[0] == "dynamo_component_drain_time_seconds"))
    assert labels["model_name"] == "m"  # falls back to the model
    m2 = WorkerMetrics(
        namespace="ns", component="c", endpoint="e", model="m", extra_labels=[("x", "")]
    )
    labels2 = dict(next(k[1] for k in samples(m2.render().decode())))
    assert "x" not in labels2


async def test_routes_metrics_and_health(http: aiohttp.ClientSession) -> None:
    metrics = make_metrics()
    # What an engine registers in setup_metrics(registry) shows up on the same page.
    Gauge("engine_custom_gauge", "engine metric", registry=metrics.registry).set(7)
    state = {"ok": True}

    async def health():
        return state["ok"], {"canary": "passed" if state["ok"] else "failed"}

    server = StatusServer(registry=metrics.registry, health=health)
    await server.start()
    try:
        assert server.port > 0 and server.base_url == f"http://127.0.0.1:{server.port}"
        base = server.base_url
        async with http.get(f"{base}/health") as r:
            assert r.status == 200
            assert await r.json() == {"status": "healthy", "canary": "passed"}
        state["ok"] = False
        async with http.get(f"{base}/health") as r:
            assert r.status == 503
            assert await r.json() == {"status": "unhealthy", "canary": "failed"}
        async with http.get(f"{base}/live") as r:
            assert r.status == 200
        async with http.get(f"{base}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            s = samples(await r.text())
        assert s[("engine_custom_gauge", ())] == 7
        assert ("dynamo_component_model_load_time_seconds", LABELS) in s
        async with http.get(f"{base}/nope") as r:
            assert r.status == 404
    finally:
        await server.close()


async def test_failing_or_missing_health_callback(http: aiohttp.ClientSession) -> None:
    async def broken():
        raise RuntimeError("engine wedged")

    async def stuck():
        await asyncio.sleep(30)
        return True, {}

    server = StatusServer(health=broken)
    await server.start()
    plain = StatusServer()
    await plain.start()
    slow = StatusServer(health=stuck, health_timeout=0.2)
    await slow.start()
    try:
        async with http.get(f"{server.base_url}/health") as r:
            assert r.status == 503
            body = await r.json()
        assert body["status"] == "unhealthy" and "engine wedged" in body["error"]
        async with http.get(f"{slow.base_url}/health") as r:
            assert r.status == 503 and "TimeoutError" in (await r.json())["error"]
        async with http.get(f"{plain.base_url}/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "healthy"
    finally:
        await server.close()
        await plain.close()
        await slow.close()


async def test_serves_card_files_only(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "model")
    (tmp_path / "secret.txt").write_text("do not serve")
    server = StatusServer()
    await server.start()
    try:
        cfg = WorkerConfig(model_name="tiny", model_path=str(model_dir))
        card = build_model_card(cfg, EngineConfig(model="tiny"), base_url=server.base_url)
        server.set_files(card.files_prefix, card.files)
        url = card.card["tokenizer"]["hf_tokenizer_json"]["path"]
        async with http.get(url) as r:
            assert r.status == 200
            assert await r.read() == (model_dir / "tokenizer.json").read_bytes()
        base = f"{server.base_url}{card.files_prefix}"
        for bad in (
            f"{base}/secret.txt",
            f"{base}/..%2F..%2Fsecret.txt",
            f"{base}/%2E%2E/%2E%2E/secret.txt",
            f"{server.base_url}/v1/metadata/dynamo/backend/generate/other/_base/tokenizer.json",
            f"{base}/tokenizer.json/extra",
            f"{server.base_url}/v1/metadata/{tmp_path}/secret.txt",
        ):
            async with http.get(bad) as r:
                assert r.status == 404, bad
        with pytest.raises(ValueError):
            server.set_files("/x", {"../secret.txt": tmp_path / "secret.txt"})
    finally:
        await server.close()


async def test_wildcard_bind_advertises_this_hosts_address(monkeypatch) -> None:
    # In a container or pod the host name resolves to its routable address: the card's file
    # URLs must use it, or a frontend in another container cannot fetch them.
    async def resolved(family: int) -> str:
        assert family == socket.AF_INET
        return "10.1.2.3"

    monkeypatch.setattr(status, "_own_address", resolved)
    server = StatusServer("0.0.0.0", 0)
    await server.start()
    try:
        assert server.base_url == f"http://10.1.2.3:{server.port}"
    finally:
        await server.close()


async def test_wildcard_bind_falls_back_to_loopback_when_the_name_does_not_resolve(
    monkeypatch,
) -> None:
    async def unresolved(family: int) -> None:
        return None

    monkeypatch.setattr(status, "_own_address", unresolved)
    server = StatusServer("0.0.0.0", 0)
    await server.start()
    try:
        assert server.base_url == f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_own_address_resolves_this_hosts_name() -> None:
    address = await status._own_address(socket.AF_INET)
    expected = {
        info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    }
    assert address in expected
