"""OTLP export, end to end: a worker with ``OTEL_EXPORT_ENABLED=1`` exports its spans.

A local OTLP/HTTP receiver (aiohttp on 127.0.0.1, ``POST /v1/traces``) stands in for a
collector. A worker process (the runtime's reference engine) runs behind the real frontend
with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at the receiver; one chat request goes
through the frontend, and the receiver must get the ``engine.generate`` span with its
attributes, decoded as ``ExportTraceServiceRequest`` protobuf (opentelemetry-proto). This is
the path of the ``tracing`` extra of a generated project: SDK + OTLP/HTTP exporter.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import Stack

from backend_common.devstack.openai import chat

pytest.importorskip(
    "opentelemetry.exporter.otlp.proto.http", reason="opentelemetry-exporter-otlp-proto-http"
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)

pytestmark = pytest.mark.e2e

MODEL = "traced"
EXPORT_TIMEOUT_S = 30.0


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []  # (resource attributes, span)
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.requests += 1
        for resource_spans in message.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((resource, span))
        return web.Response(
            body=b"", content_type="application/x-protobuf"
        )  # an empty ExportTraceServiceResponse

    def named(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        return [(res, span) for res, span in self.spans if span.name == name]


def value(any_value: Any) -> Any:
    """The Python value of an OTLP ``AnyValue``."""
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind is not None else None


async def test_worker_exports_the_engine_generate_span_over_otlp_http(make_stack) -> None:
    receiver = await OtlpReceiver().start()
    try:
        stack: Stack = make_stack("file", "tcp")
        worker = stack.start_worker(
            MODEL,
            env={
                "OTEL_EXPORT_ENABLED": "1",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_SERVICE_NAME": "traced-worker",
                # Export within 0.2 s instead of the default 5 s batch delay.
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            },
        )
        stack.frontend.wait_for_model(MODEL, timeout=60, watch=[worker])
        async with aiohttp.ClientSession() as session:
            result = await chat(
                session, stack.frontend.base_url, MODEL, "hello there", max_tokens=5, stream=True
            )
        assert result.ok, f"{result.status} {result.error}\n{worker.log_tail()}"
        assert result.usage is not None

        deadline = time.monotonic() + EXPORT_TIMEOUT_S
        while not receiver.named("engine.generate"):
            assert time.monotonic() < deadline, (
                f"no engine.generate span after {EXPORT_TIMEOUT_S}s "
                f"({receiver.requests} export requests)\n{worker.log_tail()}"
            )
            await asyncio.sleep(0.1)
    finally:
        await receiver.stop()

    [(resource, span)] = receiver.named("engine.generate")
    attrs = {a.key: value(a.value) for a in span.attributes}
    assert resource["service.name"] == "traced-worker"
    assert attrs["model"] == MODEL
    assert attrs["disagg_role"] == "agg"
    assert attrs["input_tokens"] == result.usage["prompt_tokens"]
    assert attrs["output_tokens"] == result.usage["completion_tokens"] == 5
    assert attrs["finish_reason"] == "length"
    assert attrs["cancelled"] is False
    assert attrs["ttft_ms"] >= 0 and attrs["avg_itl_ms"] >= 0
    assert len(span.trace_id) == 16 and len(span.span_id) == 8
    assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
