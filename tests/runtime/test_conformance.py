"""The conformance kit (contract.md §4): good engines pass, each broken engine fails with its kind.

Every broken engine is a subclass of ``GoodEngine`` that overrides one thing, so the failure
can only come from that one thing. Broken engines fail fast: the hanging one is cut off by
the kit's 2 s cancellation deadline, nothing relies on the 60 s per-step bound.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from backend_common import (
    EngineConfig,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    chunk,
    usage,
)
from backend_common.errors import engine_shutdown, invalid_arg
from backend_common.reference import ReferenceEngine
from backend_common.testing import (
    CANCEL_DEADLINE_S,
    CONCURRENT,
    ConformanceError,
    cancelling_context,
    collect,
    mock_context,
    run_conformance,
    standard_request,
)

BOUND_S = 5.0


class GoodEngine(LLMEngine):
    """A small engine that follows every rule; the base of the broken ones below."""

    def __init__(self) -> None:
        self.started = False
        self.cleanups = 0
        self.active = 0
        self.generates = 0
        self.kv_calls = 0
        self.metrics_calls = 0

    async def start(self, worker_id: int) -> EngineConfig:
        self.worker_id = worker_id  # only exists once started
        self.started = True
        return EngineConfig(model="good-model", kv_cache_block_size=16)

    async def kv_event_sources(self) -> list[Any]:
        self.kv_calls += 1
        return [SimpleNamespace(dp_rank=0), SimpleNamespace(dp_rank=1)]

    async def setup_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics_calls += 1
        Counter("good_requests", "requests served", registry=registry)

    def cancelled_terminal(self, prompt: int, produced: int) -> LLMEngineOutput:
        return LLMEngineOutput.cancelled().with_usage(usage(prompt, produced))

    def final_terminal(self, prompt: int, last: int, produced: int) -> LLMEngineOutput:
        return LLMEngineOutput.length().with_tokens([last]).with_usage(usage(prompt, produced))

    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
        self.generates += 1
        self.active += 1
        try:
            limit = request.stop_conditions.max_tokens or 16
            prompt = len(request.token_ids)
            for i in range(1, limit + 1):
                if ctx.is_stopped():
                    yield self.cancelled_terminal(prompt, i - 1)
                    return
                await asyncio.sleep(0)  # a real suspension: concurrent streams interleave
                if i < limit:
                    yield chunk.token(i)
                else:
                    yield self.final_terminal(prompt, i, i)
        finally:
            self.active -= 1

    async def cleanup(self) -> None:
        self.cleanups += 1
        self.started = False


# -- one broken engine per kind ---------------------------------------------------------------


class StartRaises(GoodEngine):
    async def start(self, worker_id: int) -> EngineConfig:
        raise RuntimeError("CUDA device not found")


class EmptyModel(GoodEngine):
    async def start(self, worker_id: int) -> EngineConfig:
        await super().start(worker_id)
        return EngineConfig(model="")


class KvSourcesRaise(GoodEngine):
    async def kv_event_sources(self) -> list[Any]:
        raise ConnectionRefusedError("zmq endpoint not bound")


class KvSourcesUnstable(GoodEngine):
    async def kv_event_sources(self) -> list[Any]:
        self.kv_calls += 1  # a new rank every call
        return [SimpleNamespace(dp_rank=r) for r in range(self.kv_calls)]


class SetupMetricsRaises(GoodEngine):
    async def setup_metrics(self, registry: CollectorRegistry) -> None:
        raise ValueError("duplicate timeseries")


class MetricsUnstable(GoodEngine):
    async def setup_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics_calls += 1
        Counter(f"good_requests_v{self.metrics_calls}", "requests", registry=registry)


class GenerateRaisesUpFront(GoodEngine):
    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
        raise invalid_arg("prompt too long")
        yield  # pragma: no cover - makes this an async generator


class YieldsNothing(GoodEngine):
    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
        return
        yield  # pragma: no cover


class RaisesMidStream(GoodEngine):
    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
        yield chunk.token(1)
        raise engine_shutdown("scheduler died")


class NoTerminal(GoodEngine):
    def final_terminal(self, prompt: int, last: int, produced: int) -> LLMEngineOutput:
        return chunk.token(last)


class ChunkAfterFinish(GoodEngine):
    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
        async for item in super().generate(request, ctx):
            yield item
        yield chunk.token(99)


class WrongUsage(GoodEngine):
    def final_terminal(self, prompt: int, last: int, produced: int) -> LLMEngineOutput:
        return super().final_terminal(prompt, last, produced + 1)  # counts the prompt's BOS


class OneAtATime(GoodEngine):
    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
        if self.active:
            raise RuntimeError("engine busy: only one request at a time")
        async for item in super().generate(request, ctx):
            yield item


class HangsOnLongRequests(GoodEngine):
    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
        if (request.max_tokens or 0) > 1000:
            await asyncio.Event().wait()  # never looks at ctx: only the kit's deadline ends this
        async for item in super().generate(request, ctx):
            yield item


class EndsWithStopOnCancel(GoodEngine):
    def cancelled_terminal(self, prompt: int, produced: int) -> LLMEngineOutput:
        return LLMEngineOutput.stop().with_usage(usage(prompt, produced))


class CleanupRaises(GoodEngine):
    async def cleanup(self) -> None:
        raise RuntimeError("NCCL teardown failed")


class CleanupNotIdempotent(GoodEngine):
    async def cleanup(self) -> None:
        if self.cleanups:
            raise RuntimeError("double free of KV cache")
        await super().cleanup()


class CleanupNeedsStart(GoodEngine):
    async def cleanup(self) -> None:
        print(f"releasing GPU memory of worker {self.worker_id}")  # unset before start()
        await super().cleanup()


# kind -> (broken engine, texts its message must contain: Dynamo's text, then what to do).
# Where the failure is the engine's own exception, its text is what tells the author the fix.
BROKEN: dict[str, tuple[type[GoodEngine], tuple[str, ...]]] = {
    "StartFailed": (StartRaises, ("start() failed: CUDA device not found",)),
    "EmptyModelInConfig": (EmptyModel, ("EngineConfig.model is empty", "non-empty model id")),
    "KvEventSourcesFailed": (
        KvSourcesRaise,
        ("kv_event_sources() failed: zmq endpoint not bound",),
    ),
    "KvEventSourcesNotIdempotent": (
        KvSourcesUnstable,
        ("different dp_rank set on a second call", "must be stable for the engine's lifetime"),
    ),
    "SetupMetricsFailed": (SetupMetricsRaises, ("setup_metrics() failed: duplicate timeseries",)),
    "ComponentMetricsNotIdempotent": (
        MetricsUnstable,
        ("good_requests_v1", "must be stable for the engine's lifetime"),
    ),
    "GenerateFailed": (
        GenerateRaisesUpFront,
        ("generate() failed: BackendInvalidArgument: prompt too long",),
    ),
    "NoChunksYielded": (
        YieldsNothing,
        ("generate() stream yielded no chunks", "yield at least one item"),
    ),
    "StreamYieldedError": (
        RaisesMidStream,
        ("engine stream yielded Err: BackendEngineShutdown: scheduler died", "must neither raise"),
    ),
    "NoTerminalChunk": (
        NoTerminal,
        ("stream ended without a terminal chunk", "LLMEngineOutput.length()"),
    ),
    "ChunkAfterTerminal": (
        ChunkAfterFinish,
        ("chunk yielded after terminal chunk", "must be the last item"),
    ),
    "CompletionTokensMismatch": (
        WrongUsage,
        ("emitted 8 tokens across the stream but reported", "completion_tokens = 9"),
    ),
    "ConcurrentGenerateFailed": (
        OneAtATime,
        ("concurrent generate() calls failed: engine busy", "serve 8 generate() calls at once"),
    ),
    "CancellationNotObserved": (
        HangsOnLongRequests,
        ("stream did not terminate within 2.0s after cancellation", "ctx.is_stopped()"),
    ),
    "CancellationIgnored": (
        EndsWithStopOnCancel,
        ("finish_reason was not Cancelled", "must emit FinishReason::Cancelled"),
    ),
    "CleanupFailed": (CleanupRaises, ("cleanup() failed: NCCL teardown failed",)),
    "SecondCleanupFailed": (
        CleanupNotIdempotent,
        ("second cleanup() call failed", "double free", "must be idempotent"),
    ),
    "CleanupWithoutStartFailed": (
        CleanupNeedsStart,
        ("cleanup() failed on a never-started engine", "worker_id", "must be null-safe"),
    ),
}


def test_every_kind_has_a_broken_engine() -> None:
    assert len(BROKEN) == 18
    assert all(issubclass(cls, GoodEngine) and cls is not GoodEngine for cls, _ in BROKEN.values())


async def test_good_engine_passes() -> None:
    engines: list[GoodEngine] = []

    def factory() -> GoodEngine:
        engines.append(GoodEngine())
        return engines[-1]

    await run_conformance(factory)
    main, fresh = engines
    assert main.kv_calls == 2 and main.metrics_calls == 2
    assert main.generates == 1 + CONCURRENT + 1
    assert main.active == 0, "every stream was closed"
    assert main.cleanups == 2
    assert fresh.cleanups == 1 and fresh.generates == 0


@pytest.mark.parametrize("kind", sorted(BROKEN))
async def test_broken_engine_fails_with_its_kind(kind: str) -> None:
    cls, hints = BROKEN[kind]
    with pytest.raises(ConformanceError) as info:
        await asyncio.wait_for(run_conformance(cls), CANCEL_DEADLINE_S + BOUND_S)
    err = info.value
    assert err.kind == kind, f"{cls.__name__}: expected {kind}, got {err}"
    for hint in hints:
        assert hint in err.message, f"{hint!r} not in {err.message!r}"
    assert str(err) == f"{kind}: {err.message}"
    assert isinstance(err, AssertionError)  # a failed check reads as a failed test


class SmallContext(GoodEngine):
    """States a 12-token context and records the max_tokens of every request it is handed."""

    def __init__(self, context_length: int = 12) -> None:
        super().__init__()
        self.context_length = context_length
        self.seen: list[int | None] = []

    async def start(self, worker_id: int) -> EngineConfig:
        await super().start(worker_id)
        return EngineConfig(model="small", context_length=self.context_length)

    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
        self.seen.append(request.stop_conditions.max_tokens)
        async for item in super().generate(request, ctx):
            yield item


async def test_the_kit_admits_requests_as_the_worker_does() -> None:
    engines: list[SmallContext] = []

    def factory() -> SmallContext:
        engines.append(SmallContext())
        return engines[-1]

    await run_conformance(factory)
    # The cancellation check asks for 10 000 tokens; the policy clamps them to the room the
    # 3-token prompt leaves in the stated context, as the worker would before generate.
    assert engines[0].seen[-1] == 12 - 3
    assert set(engines[0].seen[:-1]) == {8}


async def test_a_context_too_small_for_the_kits_request_is_explained() -> None:
    with pytest.raises(ConformanceError) as info:
        await run_conformance(lambda: SmallContext(context_length=3))
    assert info.value.kind == "GenerateFailed"
    assert "refuses the kit's 3-token request" in info.value.message


async def test_broken_engine_is_cleaned_up_after_failure() -> None:
    engines: list[GoodEngine] = []

    def factory() -> GoodEngine:
        engines.append(WrongUsage())
        return engines[-1]

    with pytest.raises(ConformanceError):
        await run_conformance(factory)
    assert engines[0].cleanups == 1, "the kit must not leak a started engine"


async def test_error_terminal_is_a_stream_error() -> None:
    class ErrorTerminal(GoodEngine):
        def final_terminal(self, prompt: int, last: int, produced: int) -> LLMEngineOutput:
            return LLMEngineOutput.error("out of memory")

    with pytest.raises(ConformanceError) as info:
        await run_conformance(ErrorTerminal)
    assert info.value.kind == "StreamYieldedError"
    assert "out of memory" in info.value.message


async def test_empty_concurrent_stream_is_reported() -> None:
    class EmptyUnderLoad(GoodEngine):
        async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
            if self.generates >= 1:
                self.generates += 1
                return
            async for item in super().generate(request, ctx):
                yield item

    with pytest.raises(ConformanceError) as info:
        await run_conformance(EmptyUnderLoad)
    assert info.value.kind == "ConcurrentGenerateFailed"
    assert "stream was empty" in info.value.message


async def test_cancellation_error_is_a_stream_error() -> None:
    class RaisesOnCancel(GoodEngine):
        def cancelled_terminal(self, prompt: int, produced: int) -> LLMEngineOutput:
            raise RuntimeError("cancel path crashed")

    with pytest.raises(ConformanceError) as info:
        await run_conformance(RaisesOnCancel)
    assert info.value.kind == "StreamYieldedError"
    assert "cancel path crashed" in info.value.message


async def test_coroutine_generate_is_explained() -> None:
    class ReturnsInsteadOfYields(GoodEngine):
        async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):  # type: ignore[override]
            return [LLMEngineOutput.stop()]

    with pytest.raises(ConformanceError) as info:
        await run_conformance(ReturnsInsteadOfYields)
    assert info.value.kind == "GenerateFailed"
    assert "async generator" in info.value.message and "coroutine" in info.value.message


async def test_kv_sources_may_be_mappings() -> None:
    class MappingSources(GoodEngine):
        async def kv_event_sources(self) -> list[Any]:
            self.kv_calls += 1
            return [{"dp_rank": r} for r in range(self.kv_calls)]

    with pytest.raises(ConformanceError) as info:
        await run_conformance(MappingSources)
    assert info.value.kind == "KvEventSourcesNotIdempotent"

    class StableMappingSources(GoodEngine):
        async def kv_event_sources(self) -> list[Any]:
            return [{"dp_rank": 1}, {"dp_rank": 0}]  # order does not matter, the set does

    await run_conformance(StableMappingSources)


async def test_async_factory_is_accepted() -> None:
    async def factory() -> GoodEngine:
        await asyncio.sleep(0)
        return GoodEngine()

    await run_conformance(factory)


# -- the reference engine ---------------------------------------------------------------------


async def test_reference_engine_passes() -> None:
    await run_conformance(ReferenceEngine)


async def test_reference_engine_with_delay_passes() -> None:
    await run_conformance(lambda: ReferenceEngine("slow-model", delay=0.001))


async def test_reference_engine_counts_balance() -> None:
    engine = ReferenceEngine()
    await run_conformance(lambda: engine)
    assert engine.active == 0
    assert engine.cleanups == 3  # twice by the main run, once as the "fresh" engine


# -- helpers ----------------------------------------------------------------------------------


def test_mock_context_is_fresh_and_live() -> None:
    a, b = mock_context(), mock_context()
    assert a is not b and a.id() != b.id()
    assert not a.is_stopped() and not a.is_killed()


async def test_cancelling_context_stops_after_the_delay() -> None:
    ctx = cancelling_context(0.05)
    assert not ctx.is_stopped()
    await asyncio.wait_for(ctx.stopped(), BOUND_S)
    assert ctx.is_stopped() and not ctx.is_killed()


async def test_cancelling_context_ends_a_long_stream_with_cancelled() -> None:
    class Slow(GoodEngine):
        async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
            async for item in super().generate(request, ctx):
                await asyncio.sleep(0.005)
                yield item

    engine = Slow()
    await engine.start(0)
    items = await asyncio.wait_for(
        collect(engine, standard_request("good-model", 100_000), cancelling_context(0.05)),
        BOUND_S,
    )
    assert items[-1].to_dict()["finish_reason"] == "cancelled"
    assert all(not item.is_terminal for item in items[:-1])


def test_cancelling_context_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        cancelling_context(0.01)


async def test_standard_request_and_collect() -> None:
    request = standard_request("m")
    assert request.model == "m" and request.token_ids == [1, 2, 3] and request.max_tokens == 8
    engine = GoodEngine()
    await engine.start(0)
    items = await collect(engine, request)
    assert sum(len(i.token_ids) for i in items) == 8
    assert items[-1].completion_usage == usage(3, 8)
