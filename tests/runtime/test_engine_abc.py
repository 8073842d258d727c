"""The LLMEngine ABC (contract.md §1): required methods and the defaults of the optional hooks."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from backend_common import (
    EngineConfig,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    WorkerConfig,
)


class Minimal(LLMEngine):
    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="m")

    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext):
        yield LLMEngineOutput.stop()

    async def cleanup(self) -> None:
        return None


def _without(method: str) -> type[LLMEngine]:
    namespace = {
        name: getattr(Minimal, name) for name in ("start", "generate", "cleanup") if name != method
    }
    return type(f"No{method.title()}", (LLMEngine,), namespace)


@pytest.mark.parametrize("method", ["start", "generate", "cleanup"])
def test_leaving_out_a_required_method_fails_at_instantiation(method: str) -> None:
    cls = _without(method)  # defining the class is fine ...
    with pytest.raises(TypeError, match=method):
        cls()  # ... instantiating it is not


def test_bare_abc_cannot_be_instantiated() -> None:
    with pytest.raises(TypeError):
        LLMEngine()  # type: ignore[abstract]


def test_abstract_method_set() -> None:
    assert LLMEngine.__abstractmethods__ == frozenset({"start", "generate", "cleanup"})


async def test_optional_hook_defaults() -> None:
    engine = Minimal()
    ctx = GenerateContext()
    assert await engine.abort(ctx) is None
    assert not ctx.is_stopped(), "the default abort must not touch the context"
    assert await engine.drain() is None
    assert await engine.health_check_payload() is None
    assert await engine.kv_event_sources() == []

    registry = CollectorRegistry()
    before = {m.name for m in registry.collect()}
    assert await engine.setup_metrics(registry) is None
    assert await engine.setup_metrics(registry) is None  # safe to call twice
    assert {m.name for m in registry.collect()} == before


def test_from_args_default_says_what_to_do() -> None:
    with pytest.raises(TypeError, match="engine_factory"):
        Minimal.from_args([])


def test_from_args_override_returns_engine_and_worker_config() -> None:
    class WithArgs(Minimal):
        @classmethod
        def from_args(cls, argv: list[str] | None = None) -> tuple[LLMEngine, WorkerConfig]:
            return cls(), WorkerConfig(model_name="m", component="c")

    engine, config = WithArgs.from_args(["--x"])
    assert isinstance(engine, WithArgs) and config.component == "c"


async def test_minimal_engine_streams() -> None:
    engine = Minimal()
    config = await engine.start(7)
    assert config.model == "m"
    items = [
        i async for i in engine.generate(PreprocessedRequest(token_ids=[1]), GenerateContext())
    ]
    assert [i.to_dict() for i in items] == [{"token_ids": [], "finish_reason": "stop"}]
    await engine.cleanup()


def test_engine_config_defaults() -> None:
    cfg = EngineConfig(model="m")
    assert cfg.served_model_name is None and cfg.context_length is None
    assert cfg.kv_cache_block_size is None and cfg.model_aliases == []
    assert EngineConfig(model="m").model_aliases is not cfg.model_aliases
