"""The ``engine.generate`` span: attributes, W3C parent, child spans, errors, and off = no span.

Spans go to an in-memory exporter (opentelemetry-sdk). The request is a crafted frame
through the real ``EngineAdapter`` with a ``traceparent`` header, as the frontend sends it.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import pytest
from adapter_harness import run_request

from backend_common import DisaggregationMode, GenerateContext, LLMEngineOutput, PreprocessedRequest
from backend_common.config import EngineConfig
from backend_common.errors import invalid_arg
from backend_common.reference import ReferenceEngine
from backend_common.runtime.adapter import EngineAdapter

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk not installed")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from backend_common import spans  # noqa: E402
from backend_common.args import add_common_args, worker_config_from_args  # noqa: E402
from backend_common.config import WorkerConfig  # noqa: E402
from backend_common.runtime import tracing  # noqa: E402
from backend_common.runtime.worker import Worker  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"
ENGINE_CONFIG = EngineConfig(model="traced-model", context_length=2048)


class ChildSpanEngine(ReferenceEngine):
    """Opens a child span and tags the current span; refuses token 7."""

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if 7 in request.token_ids:
            raise invalid_arg("token 7 is not allowed")
        spans.current_span().set_attribute("engine.batch", 1)
        with spans.start_span("kv_load", blocks=2):
            pass
        async for item in super().generate(request, ctx):
            yield item


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    exp = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracing.set_tracer_provider(provider)
    return exp


def adapter(
    mode: DisaggregationMode = DisaggregationMode.AGGREGATED, *, on: bool = True
) -> EngineAdapter:
    return EngineAdapter(
        ChildSpanEngine("traced-model"),
        mode=mode,
        engine_config=ENGINE_CONFIG,
        tracer=tracing.GenerateTracer.create(on, mode, ENGINE_CONFIG.model),
    )


def test_otel_export_enabled_turns_tracing_on_and_the_worker_passes_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = add_common_args(argparse.ArgumentParser())
    monkeypatch.delenv("OTEL_EXPORT_ENABLED", raising=False)
    assert worker_config_from_args(parser.parse_args([])).tracing is False
    monkeypatch.setenv("OTEL_EXPORT_ENABLED", "1")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-backend")
    config = worker_config_from_args(parser.parse_args([]))
    assert config.tracing is True and config.otel_service_name == "my-backend"
    for on in (True, False):
        worker = Worker(ChildSpanEngine("m"), WorkerConfig(tracing=on))
        worker.engine_config = ENGINE_CONFIG
        assert (worker._build_adapter().tracer is not None) is on


async def test_generate_span_records_the_request(exporter) -> None:
    a = adapter(DisaggregationMode.DECODE)
    assert a.tracer is not None
    request = {
        "token_ids": [1, 2, 3],
        "stop_conditions": {"max_tokens": 4},
        "prefill_result": {"disaggregated_params": {"h": 1}},
    }
    await run_request(a, request, headers={"traceparent": TRACEPARENT})
    spans = {s.name: s for s in exporter.get_finished_spans()}
    span = spans["engine.generate"]
    attrs = dict(span.attributes)
    assert attrs["model"] == "traced-model"
    assert attrs["input_tokens"] == 3
    assert attrs["disagg_role"] == "decode"
    assert attrs["output_tokens"] == 4
    assert attrs["finish_reason"] == "length"
    assert attrs["cancelled"] is False
    assert attrs["ttft_ms"] >= 0
    for key in ("avg_itl_ms", "itl_p50_ms", "itl_p99_ms", "itl_max_ms"):
        assert attrs[key] >= 0
    assert attrs["itl_p50_ms"] <= attrs["itl_p99_ms"] <= attrs["itl_max_ms"]
    assert attrs["engine.batch"] == 1  # set by engine code on the current span
    # The frontend's trace is continued.
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_SPAN
    # The engine's child span hangs under engine.generate.
    child = spans["kv_load"]
    assert child.parent is not None and child.parent.span_id == span.context.span_id
    assert dict(child.attributes) == {"blocks": 2}


async def test_error_is_recorded_on_the_span(exporter) -> None:
    await run_request(adapter(), {"token_ids": [7], "stop_conditions": {"max_tokens": 2}})
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "engine.generate"]
    assert span.attributes["error_kind"] == "BackendInvalidArgument"
    assert not span.status.is_ok
    assert span.parent is None  # no traceparent: a new trace


async def test_every_request_gets_its_own_span(exporter) -> None:
    a = adapter()
    for n in range(3):
        await run_request(
            a, {"token_ids": [1], "stop_conditions": {"max_tokens": 1}}, request_id=f"r{n}"
        )
    spans = [s for s in exporter.get_finished_spans() if s.name == "engine.generate"]
    assert sorted(s.attributes["request_id"] for s in spans) == ["r0", "r1", "r2"]
    assert all(s.attributes["output_tokens"] == 1 for s in spans)
    assert all("itl_p50_ms" not in s.attributes for s in spans)  # needs two token items


async def test_off_means_no_tracer_and_no_spans() -> None:
    exp = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracing.set_tracer_provider(provider)
    a = adapter(on=False)
    assert a.tracer is None  # the adapter's stream is not wrapped at all
    out = await run_request(a, {"token_ids": [1, 2], "stop_conditions": {"max_tokens": 2}})
    assert b"complete_final" in out
    assert exp.get_finished_spans() == ()
    # Engine-side helpers are silent no-ops.
    with spans.start_span("x", a=1) as span:
        span.set_attribute("k", "v")
    assert not spans.current_span().is_recording()
