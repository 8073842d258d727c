"""``backend_common.dynamo_compat``: 1.6.1-style engines on our worker contract.

Dynamo 1.6.1's own sample engine (loaded unmodified from the frontend venv's wheel, its
imports aliased) and the 1.6.1-style skeleton pass the conformance kit through the adapter;
then the adapter's mappings one by one: chunks (malformed ones are typed errors), the
``WorkerConfig`` field mapping and its refusals, hooks refused at start, the prefill drain,
the ``Context`` view, KV events on a real NATS event plane, the Prometheus bridge.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from dynamo_style_skeleton import DynamoStyleSkeleton
from dynamo_wheel import backend_dir
from prometheus_client import CollectorRegistry, generate_latest

from backend_common import DisaggregationMode as NativeMode
from backend_common import GenerateContext, PreprocessedRequest
from backend_common.config import WorkerConfig as NativeWorkerConfig
from backend_common.dynamo_compat import (
    Context,
    EngineConfig,
    LLMEngine,
    LlmRegistration,
    WorkerConfig,
    aliases,
)
from backend_common.dynamo_compat.adapter import DynamoEngineAdapter, adapt
from backend_common.dynamo_compat.core import ModelInput
from backend_common.dynamo_compat.engine import ForcedTokenSequenceSpec, LogitsProcessorSpec
from backend_common.errors import BackendError, DynamoError
from backend_common.runtime.kv_events.plane import EventPlane
from backend_common.runtime.kv_events.records import KV_EVENTS_TOPIC, subject_prefix
from backend_common.runtime.kv_events.transports import NatsTransport
from backend_common.testing import run_conformance

KV_EVENT_WAIT_S = 10.0


@pytest.fixture(scope="module")
def sample_cls(frontend_python: str) -> Iterator[type]:
    """Dynamo 1.6.1's ``SampleLLMEngine``, from the wheel, imports resolved to dynamo_compat."""
    aliases.install([backend_dir(frontend_python)])
    try:
        module = importlib.import_module("dynamo.common.backend.sample_engine")
        assert Path(module.__file__).parent == backend_dir(frontend_python)
        yield module.SampleLLMEngine
    finally:
        aliases.uninstall()


def request(**fields: Any) -> PreprocessedRequest:
    return PreprocessedRequest.from_dict({"token_ids": [1, 2, 3], **fields})


async def collect(engine: DynamoEngineAdapter, req: PreprocessedRequest, ctx=None) -> list:
    return [item async for item in engine.generate(req, ctx or GenerateContext())]


class Scripted(LLMEngine):
    """A 1.6.1-style engine that yields the given chunks (and records its hook calls)."""

    def __init__(self, chunks: list[Any] | None = None) -> None:
        self.chunks = chunks or []
        self.calls: list[str] = []
        self.quiescent: list[bool | None] = []
        self.seen: list[dict[str, Any]] = []

    @classmethod
    async def from_args(cls, argv=None):
        return cls(), WorkerConfig(namespace="test")

    async def start(self, worker_id: int) -> EngineConfig:
        self.calls.append("start")
        return EngineConfig(model="scripted", llm=LlmRegistration(kv_cache_block_size=16))

    async def generate(self, request, context) -> AsyncGenerator[Any, None]:
        self.seen.append(request)
        for chunk in self.chunks:
            yield chunk

    async def is_quiescent(self) -> bool | None:
        self.calls.append("is_quiescent")
        return self.quiescent.pop(0) if self.quiescent else None

    async def cleanup(self) -> None:
        self.calls.append("cleanup")


# -- conformance ------------------------------------------------------------------------------
async def test_conformance_kit_passes_on_dynamos_sample_engine(sample_cls) -> None:
    _, config = await sample_cls.from_args(["--delay", "0"])
    await run_conformance(lambda: DynamoEngineAdapter(sample_cls(delay=0.0), config))


async def test_conformance_kit_passes_on_the_dynamo_style_skeleton() -> None:
    engine, config = await DynamoStyleSkeleton.from_args([])
    await run_conformance(lambda: DynamoEngineAdapter(DynamoStyleSkeleton(), config))


# -- chunks and requests ----------------------------------------------------------------------
async def test_request_reaches_the_engine_as_the_wire_dict() -> None:
    engine = Scripted([{"token_ids": [5], "index": 0, "finish_reason": "length"}])
    adapter = DynamoEngineAdapter(engine)
    await adapter.start(1)
    body = {"stop_conditions": {"max_tokens": 1}, "output_options": {"logprobs": 2}}
    (item,) = await collect(adapter, request(**body))
    assert engine.seen == [{"token_ids": [1, 2, 3], **body}]
    assert item.token_ids == [5] and item.finish_reason == "length" and item.index == 0


async def test_chunk_fields_become_output_fields() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    terminal = {
        "token_ids": [7],
        "index": 0,
        "finish_reason": "stop",
        "completion_usage": usage,
        "log_probs": [-0.5],
        "top_logprobs": [[{"rank": 1, "token_id": 7, "token": "w7", "logprob": -0.5}]],
        "disaggregated_params": {"handle": "h"},
        "engine_data": {"prompt_logprobs": None},
    }
    adapter = DynamoEngineAdapter(Scripted([terminal]))
    await adapter.start(1)
    (item,) = await collect(adapter, request())
    assert item.to_dict() == {**terminal, "finish_reason": "stop"}


@pytest.mark.parametrize(
    "bad",
    [
        "not a dict",
        {"token_ids": ["w1"], "index": 0},
        {"token_ids": [-1], "index": 0},
        {"token_ids": [1], "index": 0, "finish_reason": "exploded"},
        {"token_ids": [1], "index": 0, "unknown_field": 1},
    ],
)
async def test_a_malformed_chunk_is_a_typed_error(bad: Any) -> None:
    adapter = DynamoEngineAdapter(Scripted([{"token_ids": [1], "index": 0}, bad]))
    await adapter.start(1)
    stream = adapter.generate(request(), GenerateContext())
    first = await anext(stream)
    assert first.token_ids == [1]
    with pytest.raises(DynamoError) as err:
        await anext(stream)
    assert err.value.backend_error is BackendError.Unknown
    assert "malformed chunk" in str(err.value)


# -- WorkerConfig -----------------------------------------------------------------------------
def test_worker_config_maps_field_by_field(monkeypatch) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://127.0.0.1:23790")
    monkeypatch.setenv("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", "1.5")
    config = WorkerConfig(
        "ns",
        "comp",
        "ep",
        "model-dir",
        "public",
        ModelInput.Tokens,
        "chat",
        "file",
        "nats",
        "nats",
        False,
        "{{ template }}",
        "hermes",
        "qwen3",
        False,
        False,
        False,
        [("team", "a")],
        NativeMode.PREFILL,
        {"token_ids": [1], "_HEALTH_CHECK": True},
        {"scope": "always"},
    )
    native = config.to_native()
    assert isinstance(native, NativeWorkerConfig)
    same = [
        "namespace",
        "component",
        "endpoint",
        "model_name",
        "served_model_name",
        "endpoint_types",
        "discovery_backend",
        "request_plane",
        "event_plane",
        "custom_jinja_template",
        "tool_call_parser",
        "reasoning_parser",
        "exclude_tools_when_tool_choice_none",
        "enable_local_indexer",
        "enable_kv_routing",
        "metrics_labels",
        "disaggregation_mode",
        "health_check_payload",
        "structural_tag",
    ]
    assert {f: getattr(native, f) for f in same} == {f: getattr(config, f) for f in same}
    # What 1.6.1 leaves to its runtime's environment comes from the environment.
    assert native.etcd_endpoints == "http://127.0.0.1:23790"
    assert native.graceful_shutdown_grace_period == 1.5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_input", ModelInput.Text),
        ("route_to_encoder", True),
        ("media_decoder", object()),
        ("media_fetcher", object()),
        ("kv_state_endpoint", "kv"),
        ("default_thinking_mode", "disabled"),
        ("response_plane", "quic"),
    ],
)
def test_worker_config_fields_without_equivalent_are_refused(field: str, value: Any) -> None:
    with pytest.raises(DynamoError, match=field) as err:
        WorkerConfig(namespace="ns", **{field: value}).to_native()
    assert err.value.backend_error is BackendError.InvalidArgument


def test_use_kv_events_is_ignored_with_a_warning() -> None:
    with pytest.warns(DeprecationWarning, match="use_kv_events"):
        WorkerConfig(namespace="ns", use_kv_events=True).to_native()


# -- hooks without an equivalent --------------------------------------------------------------
class WithControls(Scripted):
    def supported_controls(self) -> set[str]:
        return {"pause"}


class WithUpdates(Scripted):
    def supported_updates(self) -> set[str]:
        return {"lora"}


class WithEndpointHook(Scripted):
    async def on_endpoint_ready(self, endpoint) -> None:
        return None


class WithLogits(Scripted):
    async def logits_processor_spec(self):
        return LogitsProcessorSpec((ForcedTokenSequenceSpec((1,), 2),))


class WithEagle(Scripted):
    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="m", llm=LlmRegistration(enable_eagle=True))


@pytest.mark.parametrize(
    ("engine_cls", "named"),
    [
        (WithControls, "supported_controls"),
        (WithUpdates, "supported_updates"),
        (WithEndpointHook, "on_endpoint_ready"),
        (WithLogits, "logits_processor_spec"),
        (WithEagle, "enable_eagle"),
    ],
)
async def test_hooks_without_an_equivalent_fail_start_naming_the_hook(engine_cls, named) -> None:
    adapter = DynamoEngineAdapter(engine_cls())
    with pytest.raises(DynamoError, match=named) as err:
        await adapter.start(1)
    assert err.value.backend_error is BackendError.InvalidArgument
    await adapter.cleanup()  # the worker's cleanup after a failed start reaches the engine


def test_raw_engines_are_refused(frontend_python: str) -> None:
    aliases.install([backend_dir(frontend_python)])
    try:
        module = importlib.import_module("dynamo.common.backend.sample_diffusion_engine")
        engine = module.SampleDiffusionEngine.__new__(module.SampleDiffusionEngine)
        with pytest.raises(DynamoError, match="RawEngine"):
            DynamoEngineAdapter(engine)
    finally:
        aliases.uninstall()


async def test_cleanup_reaches_the_engine_only_after_start() -> None:
    engine = Scripted()
    adapter = DynamoEngineAdapter(engine)
    await adapter.cleanup()
    assert engine.calls == []
    await adapter.start(1)
    await adapter.cleanup()
    assert engine.calls == ["start", "cleanup"]


# -- drain ------------------------------------------------------------------------------------
def _adapter(engine: Scripted, mode: NativeMode, timeout: float = 30.0) -> DynamoEngineAdapter:
    config = WorkerConfig(namespace="ns", disaggregation_mode=mode)
    return DynamoEngineAdapter(
        engine, config, graceful_shutdown_timeout=timeout, poll_interval=0.02
    )


async def test_prefill_drain_polls_is_quiescent_until_true() -> None:
    engine = Scripted()
    engine.quiescent = [False, None, True]
    adapter = _adapter(engine, NativeMode.PREFILL)
    await adapter.start(1)
    await adapter.drain()
    await adapter.cleanup()
    assert engine.calls == ["start", "is_quiescent", "is_quiescent", "is_quiescent", "cleanup"]


async def test_prefill_drain_is_bounded_by_the_prefill_drain_timeout(monkeypatch) -> None:
    monkeypatch.setenv("DYN_PREFILL_DRAIN_TIMEOUT_S", "0.3")
    engine = Scripted()  # never says quiescent
    adapter = _adapter(engine, NativeMode.PREFILL)
    started = time.monotonic()
    await adapter.drain()
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2.0
    assert engine.calls.count("is_quiescent") >= 3


def test_drain_budget_is_capped_at_the_shutdown_timeout_less_the_cleanup_reserve(
    monkeypatch,
) -> None:
    monkeypatch.delenv("DYN_PREFILL_DRAIN_TIMEOUT_S", raising=False)
    assert _adapter(Scripted(), NativeMode.PREFILL).drain_budget() == 25.0
    assert _adapter(Scripted(), NativeMode.PREFILL, timeout=7.0).drain_budget() == 2.0
    assert _adapter(Scripted(), NativeMode.PREFILL, timeout=3.0).drain_budget() == 0.0
    monkeypatch.setenv("DYN_PREFILL_DRAIN_TIMEOUT_S", "-4")
    assert _adapter(Scripted(), NativeMode.PREFILL).drain_budget() == 0.0
    monkeypatch.setenv("DYN_PREFILL_DRAIN_TIMEOUT_S", "soon")
    assert _adapter(Scripted(), NativeMode.PREFILL).drain_budget() == 25.0


@pytest.mark.parametrize("mode", [NativeMode.AGGREGATED, NativeMode.DECODE, NativeMode.ENCODE])
async def test_other_roles_are_never_polled(mode: NativeMode) -> None:
    engine = Scripted()
    await _adapter(engine, mode).drain()
    assert engine.calls == []


# -- Context ----------------------------------------------------------------------------------
async def test_context_is_a_view_of_the_request_context() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    native = GenerateContext("req-1", trace_headers={"traceparent": traceparent})
    ctx = Context(native=native)
    assert ctx.id() == "req-1" and not ctx.is_stopped() and not ctx.is_killed()
    assert ctx.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert ctx.parent_span_id == "b7ad6b7169203331"
    assert ctx.trace_headers() == {"traceparent": traceparent}
    waiter = ctx.async_killed_or_stopped()
    await asyncio.sleep(0)
    assert not waiter.done()
    native.kill()
    assert await asyncio.wait_for(waiter, 1) is True
    assert ctx.is_stopped() and ctx.is_killed()
    plain = Context()
    assert plain.trace_id is None and plain.trace_headers() is None
    plain.stop_generating()
    assert plain.native.is_stopped()
    with plain.start_span("child", {"n": 1}) as span:  # tracing off: silent no-ops
        span.set_attribute("k", 1)
        span.set_status("error", "boom")
    plain.current_span().add_event("e")


# -- KV events --------------------------------------------------------------------------------
async def test_sample_engine_kv_events_reach_the_nats_event_plane(sample_cls, nats_server) -> None:
    nc = await nats.connect(nats_server.url)
    got: list[dict[str, Any]] = []
    both = asyncio.Event()
    prefix = subject_prefix("dynamo", "sample", "generate")

    async def keep(msg: Any) -> None:
        envelope = msgpack.unpackb(msg.data, raw=False)
        got.extend(msgpack.unpackb(envelope["payload"], raw=False))
        if len(got) >= 2:
            both.set()

    await nc.subscribe(f"{prefix}.{KV_EVENTS_TOPIC}", cb=keep)
    plane = EventPlane(
        await NatsTransport.connect(nats_server.url), "dynamo", "sample", "generate", 77
    )
    engine = sample_cls(max_tokens=2, delay=0.0)
    adapter = DynamoEngineAdapter(engine)
    try:
        await adapter.start(77)
        config = await engine.start(77)
        (source,) = await adapter.kv_event_sources()
        source.on_ready(plane.kv_publisher(source.dp_rank, config.llm.kv_cache_block_size))
        items = await collect(adapter, PreprocessedRequest.from_dict({"token_ids": [1] * 32}))
        assert items[-1].finish_reason == "length"
        await asyncio.wait_for(both.wait(), KV_EVENT_WAIT_S)
    finally:
        await adapter.cleanup()
        await plane.close()
        await nc.close()
    kinds = [next(iter(e["event"]["data"])) for e in got]
    assert kinds == ["stored", "removed"], got
    stored = got[0]["event"]["data"]["stored"]
    assert [b["block_hash"] for b in stored["blocks"]] == [1, 2]
    assert got[0]["worker_id"] == 77
    assert got[1]["event"]["data"]["removed"]["block_hashes"] == [1, 2]


# -- metrics ----------------------------------------------------------------------------------
class WithPrometheus(Scripted):
    async def register_prometheus(self, metrics) -> None:
        labels = ",".join(f'{k}="{v}"' for k, v in metrics.auto_labels)
        metrics.register_prometheus_expfmt_callback(
            lambda: f"# TYPE vendor_requests counter\nvendor_requests_total{{{labels}}} 3.0\n"
        )


async def test_register_prometheus_is_served_on_the_worker_registry() -> None:
    registry = CollectorRegistry()
    config = WorkerConfig(namespace="ns", metrics_labels=[("team", "a")])
    adapter = DynamoEngineAdapter(WithPrometheus(), config)
    await adapter.setup_metrics(registry)
    text = generate_latest(registry).decode()
    assert 'vendor_requests_total{team="a"} 3.0' in text


# -- aliases ----------------------------------------------------------------------------------
def test_aliases_resolve_to_the_compat_modules_and_uninstall_cleanly() -> None:
    aliases.install()
    try:
        from dynamo.common.backend import LLMEngine as Aliased  # type: ignore[import-not-found]
        from dynamo.llm import KvEventPublisher  # type: ignore[import-not-found]

        assert Aliased is LLMEngine
        assert KvEventPublisher.__module__ == "backend_common.dynamo_compat.llm"
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("dynamo.vllm")
    finally:
        aliases.uninstall()
    assert not [m for m in sys.modules if m == "dynamo" or m.startswith("dynamo.")]


def test_adapt_builds_the_adapter_and_our_config() -> None:
    engine, native = adapt(Scripted(), WorkerConfig(namespace="ns", component="c"))
    assert isinstance(engine, DynamoEngineAdapter)
    assert (native.namespace, native.component) == ("ns", "c")
    with pytest.raises(TypeError, match="WorkerConfig"):
        adapt(Scripted(), NativeWorkerConfig())  # type: ignore[arg-type]
