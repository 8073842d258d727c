"""Conformance kit: prove an engine satisfies the ``LLMEngine`` contract.

    from backend_common.testing import run_conformance

    async def test_conformance():
        await run_conformance(lambda: MyEngine(...))

``factory()`` (sync or async) must return a fresh, not-started engine; it is
called twice: once for the engine under test, once for a never-started engine.
The checks run in Dynamo's order (docs/contract.md#conformance-kit); the first failure
raises ``ConformanceError`` whose ``kind`` is the Rust kit's variant name and
whose message says what to fix. The kit calls the engine directly: no network,
no worker. Each request first goes through the worker's own admission check
(``request_policy.check_request`` against the ``EngineConfig`` that ``start`` returned), so
the engine sees what a worker would hand it. Streams are read through the debug validator.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from .config import EngineConfig
from .context import GenerateContext
from .engine import LLMEngine
from .errors import DynamoError
from .request_policy import check_request
from .streams import close_stream
from .types import FinishReason, LLMEngineOutput, PreprocessedRequest, StopConditions
from .validate import S1_MESSAGE, ContractViolation, validated

__all__ = [
    "CANCEL_DEADLINE_S",
    "CONCURRENT",
    "ConformanceError",
    "cancelling_context",
    "collect",
    "mock_context",
    "run_conformance",
    "standard_request",
]

_NO_CHUNKS = (
    "generate() stream yielded no chunks (yield at least one item; the last one must have "
    "finish_reason set)"
)
_NO_TERMINAL = (
    "stream ended without a terminal chunk (end every stream with exactly one item that has "
    "finish_reason set: LLMEngineOutput.length() / .stop() / .eos(), optionally "
    ".with_tokens([...]) and .with_usage(usage(prompt, completion)))"
)
_STREAM_ERR = "(a normal request must neither raise nor end with LLMEngineOutput.error())"

CANCEL_DEADLINE_S = 2.0
CONCURRENT = 8
STANDARD_MAX_TOKENS = 8
LONG_MAX_TOKENS = 10_000
# Bound on any single step, so a hanging engine fails the kit instead of hanging it.
STEP_TIMEOUT_S = 60.0

EngineFactory = Callable[[], LLMEngine | Awaitable[LLMEngine]]


class ConformanceError(AssertionError):
    """A failed conformance check. ``kind`` names the check (Dynamo's variant name)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def mock_context() -> GenerateContext:
    """A fresh, live context with a random id."""
    return GenerateContext()


def cancelling_context(after_s: float) -> GenerateContext:
    """A context that calls ``stop_generating()`` after ``after_s`` seconds of wall time.

    Needs a running event loop. Time-based: how many items come out before the
    cancel depends on the engine's speed.
    """
    ctx = GenerateContext()
    asyncio.get_running_loop().call_later(after_s, ctx.stop_generating)
    return ctx


def standard_request(model: str, max_tokens: int = STANDARD_MAX_TOKENS) -> PreprocessedRequest:
    return PreprocessedRequest(
        model=model, token_ids=[1, 2, 3], stop_conditions=StopConditions(max_tokens=max_tokens)
    )


def _admitted(config: EngineConfig, max_tokens: int = STANDARD_MAX_TOKENS) -> PreprocessedRequest:
    """The kit's request as the worker hands it over: checked and clamped by the policy."""
    request = standard_request(config.model, max_tokens)
    try:
        return check_request(request, config)
    except DynamoError as exc:
        raise ConformanceError(
            "GenerateFailed",
            f"the worker refuses the kit's {len(request.token_ids)}-token request under the "
            f"EngineConfig start() returned: {exc.message}",
        ) from exc


async def collect(
    engine: LLMEngine, request: PreprocessedRequest, ctx: GenerateContext | None = None
) -> list[LLMEngineOutput]:
    """Run one ``generate`` to the end through the validator and return its items."""
    ctx = ctx or mock_context()
    return [item async for item in validated(engine.generate(request, ctx))]


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _rank_set(sources: list[Any]) -> list[int]:
    # A source is an object with a ``dp_rank`` attribute or a mapping with that key.
    def rank(source: Any) -> int:
        value = (
            source.get("dp_rank") if isinstance(source, Mapping) else getattr(source, "dp_rank", 0)
        )
        return int(value or 0)

    return sorted(rank(s) for s in sources)


def _open_stream(
    engine: LLMEngine, request: PreprocessedRequest, ctx: GenerateContext
) -> AsyncIterator[LLMEngineOutput]:
    """Call ``generate``; a result that cannot be iterated is a GenerateFailed, said plainly."""
    stream = engine.generate(request, ctx)
    if not hasattr(stream, "__anext__"):
        if inspect.iscoroutine(stream):
            stream.close()  # never awaited: close it so no "never awaited" warning leaks
        raise ConformanceError(
            "GenerateFailed",
            "generate() failed: it must return an async iterator of LLMEngineOutput (write it as "
            f"an async generator: `async def generate(...)` that uses `yield`); got "
            f"{type(stream).__name__}",
        )
    return stream


def _metric_names(registry: CollectorRegistry) -> set[str]:
    return {family.name for family in registry.collect()}


class _Outcome:
    """Items of one stream, plus the exception that ended it (if any)."""

    __slots__ = ("items", "error", "error_before_first")

    def __init__(self) -> None:
        self.items: list[LLMEngineOutput] = []
        self.error: BaseException | None = None
        self.error_before_first = False


async def _drain(engine: LLMEngine, request: PreprocessedRequest, ctx: GenerateContext) -> _Outcome:
    out = _Outcome()
    try:
        stream = _open_stream(engine, request, ctx)
        async for item in validated(stream):
            out.items.append(item)
    except (ContractViolation, ConformanceError):
        raise
    except Exception as exc:  # noqa: BLE001 - any engine error is an outcome to classify
        out.error = exc
        out.error_before_first = not out.items
    return out


async def _step(coro: Awaitable[Any], kind: str, what: str) -> Any:
    try:
        return await asyncio.wait_for(coro, STEP_TIMEOUT_S)
    except TimeoutError as exc:
        raise ConformanceError(kind, f"{what} did not finish within {STEP_TIMEOUT_S:.0f}s") from exc


async def _check_single(engine: LLMEngine, config: EngineConfig) -> None:
    try:
        out = await _step(
            _drain(engine, _admitted(config), mock_context()), "GenerateFailed", "generate()"
        )
    except ContractViolation as exc:
        if str(exc) == S1_MESSAGE:
            raise ConformanceError(
                "ChunkAfterTerminal", f"chunk yielded after terminal chunk ({S1_MESSAGE})"
            ) from exc
        raise ConformanceError(
            "StreamYieldedError", f"engine stream yielded Err: {exc} {_STREAM_ERR}"
        ) from exc
    if out.error is not None and out.error_before_first:
        raise ConformanceError("GenerateFailed", f"generate() failed: {out.error}")
    if not out.items and out.error is None:
        raise ConformanceError("NoChunksYielded", _NO_CHUNKS)
    if out.error is not None:
        raise ConformanceError(
            "StreamYieldedError", f"engine stream yielded Err: {out.error} {_STREAM_ERR}"
        )
    for item in out.items:
        if item.finish_reason is FinishReason.ERROR:
            raise ConformanceError(
                "StreamYieldedError",
                f"engine stream yielded Err: {item.error_message} {_STREAM_ERR}",
            )
    terminals = [i for i, item in enumerate(out.items) if item.finish_reason is not None]
    if not terminals:
        raise ConformanceError("NoTerminalChunk", _NO_TERMINAL)
    if len(terminals) > 1 or terminals[0] != len(out.items) - 1:
        raise ConformanceError("ChunkAfterTerminal", "chunk yielded after terminal chunk")
    terminal = out.items[-1]
    if terminal.completion_usage is not None:
        chunked = sum(len(item.token_ids) for item in out.items)
        reported = terminal.completion_usage.get("completion_tokens")
        if reported != chunked:
            raise ConformanceError(
                "CompletionTokensMismatch",
                f"engine emitted {chunked} tokens across the stream but reported "
                f"completion_usage.completion_tokens = {reported} on the terminal "
                "(engine bookkeeping diverges from streamed output)",
            )


async def _check_concurrent(engine: LLMEngine, config: EngineConfig) -> None:
    async def one() -> None:
        out = await _drain(engine, _admitted(config), mock_context())
        if out.error is not None:
            raise out.error
        if not out.items:
            raise RuntimeError("stream was empty")

    results = await _step(
        asyncio.gather(*(one() for _ in range(CONCURRENT)), return_exceptions=True),
        "ConcurrentGenerateFailed",
        f"{CONCURRENT} concurrent generate() calls",
    )
    for result in results:
        if isinstance(result, BaseException):
            raise ConformanceError(
                "ConcurrentGenerateFailed",
                f"concurrent generate() calls failed: {result} (after start() returns, the engine "
                f"must serve {CONCURRENT} generate() calls at once)",
            )


async def _check_cancellation(engine: LLMEngine, config: EngineConfig) -> None:
    ctx = mock_context()
    request = _admitted(config, LONG_MAX_TOKENS)
    out = _Outcome()

    async def consume() -> None:
        stream = _open_stream(engine, request, ctx)
        # Cancel before the first poll: no tokens are expected, and no timer race.
        ctx.stop_generating()
        try:
            async for item in stream:
                out.items.append(item)
                if item.finish_reason is not None:
                    break
        except Exception as exc:  # noqa: BLE001
            out.error = exc
        finally:
            await close_stream(stream)

    try:
        await asyncio.wait_for(consume(), CANCEL_DEADLINE_S)
    except TimeoutError as exc:
        raise ConformanceError(
            "CancellationNotObserved",
            f"stream did not terminate within {CANCEL_DEADLINE_S}s after cancellation "
            "(poll ctx.is_stopped() between yields, or race your work against ctx.stopped())",
        ) from exc
    if out.error is not None:
        raise ConformanceError(
            "StreamYieldedError", f"engine stream yielded Err: {out.error} {_STREAM_ERR}"
        )
    if not out.items:
        raise ConformanceError("NoChunksYielded", _NO_CHUNKS)
    if out.items[-1].finish_reason is not FinishReason.CANCELLED:
        raise ConformanceError(
            "CancellationIgnored",
            "stream terminated but terminal chunk's finish_reason was not Cancelled "
            "(engine must emit FinishReason::Cancelled when it observes cancellation)",
        )


async def _call(coro: Awaitable[Any], kind: str, what: str, failed: str | None = None) -> Any:
    """Await one engine call within ``STEP_TIMEOUT_S``; any exception is the ``kind`` failure.

    The message is ``{failed}: {exception}`` (``failed`` defaults to ``{what} failed``).
    """
    try:
        return await _step(coro, kind, what)
    except ConformanceError:
        raise
    except Exception as exc:
        raise ConformanceError(kind, f"{failed or what + ' failed'}: {exc}") from exc


async def _check_start(engine: LLMEngine) -> EngineConfig:
    config = await _call(engine.start(0), "StartFailed", "start()")
    if not (getattr(config, "model", "") or ""):
        raise ConformanceError(
            "EmptyModelInConfig",
            "EngineConfig.model is empty (start() must return EngineConfig(model=...) with the "
            "canonical, non-empty model id)",
        )
    return config


async def _check_kv_event_sources(engine: LLMEngine) -> None:
    ranks = []
    for _ in range(2):
        sources = await _call(
            engine.kv_event_sources(), "KvEventSourcesFailed", "kv_event_sources()"
        )
        ranks.append(_rank_set(list(sources or [])))
    if ranks[0] != ranks[1]:
        raise ConformanceError(
            "KvEventSourcesNotIdempotent",
            "kv_event_sources() returned different dp_rank set on a second call "
            "(the descriptor list must be stable for the engine's lifetime)",
        )


async def _check_metrics(engine: LLMEngine) -> None:
    names = []
    for _ in range(2):
        registry = CollectorRegistry()
        await _call(engine.setup_metrics(registry), "SetupMetricsFailed", "setup_metrics()")
        names.append(_metric_names(registry))
    if names[0] != names[1]:
        raise ConformanceError(
            "ComponentMetricsNotIdempotent",
            "setup_metrics() registered different metrics across calls "
            f"({sorted(names[0] ^ names[1])}); the metric set must be stable for the "
            "engine's lifetime",
        )


async def _check_cleanup(engine: LLMEngine) -> None:
    await _call(engine.cleanup(), "CleanupFailed", "cleanup()")
    await _call(
        engine.cleanup(),
        "SecondCleanupFailed",
        "second cleanup()",
        "second cleanup() call failed (must be idempotent)",
    )


async def _check_cleanup_without_start(factory: EngineFactory) -> None:
    fresh: LLMEngine = await _maybe_await(factory())
    try:
        await _step(fresh.cleanup(), "CleanupWithoutStartFailed", "cleanup() on a fresh engine")
    except ConformanceError:
        raise
    except Exception as exc:
        raise ConformanceError(
            "CleanupWithoutStartFailed",
            f"cleanup() failed on a never-started engine: {exc} (Worker calls cleanup() after "
            "start() raises, so engines must be null-safe against partial / no allocation)",
        ) from exc


async def run_conformance(factory: EngineFactory) -> None:
    """Run every check of docs/contract.md#conformance-kit in order.

    Raises ``ConformanceError`` on the first failure; its ``kind`` names the check.
    """
    engine: LLMEngine = await _maybe_await(factory())
    cleaned = False
    try:
        config = await _check_start(engine)
        await _check_kv_event_sources(engine)
        await _check_metrics(engine)
        await _check_single(engine, config)
        await _check_concurrent(engine, config)
        await _check_cancellation(engine, config)
        cleaned = True
        await _check_cleanup(engine)
    finally:
        if not cleaned:
            # Best effort so a failing engine does not leak tasks into the caller's loop.
            try:
                await asyncio.wait_for(engine.cleanup(), 5.0)
            except Exception:  # noqa: BLE001
                pass
    await _check_cleanup_without_start(factory)
