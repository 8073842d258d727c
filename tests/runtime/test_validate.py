"""Debug stream validator (docs/contract.md, stream rules S1 and S2)."""

from __future__ import annotations

import argparse

import pytest

from backend_common import LLMEngineOutput, chunk
from backend_common.args import add_common_args, worker_config_from_args
from backend_common.config import DisaggregationMode
from backend_common.validate import (
    S1_MESSAGE,
    ContractViolation,
    maybe_validated,
    validated,
)

S2_PREFIX = (
    "Encode-mode contract violation: non-cancelled terminal chunk must carry "
    "encoder_result: Some(Value::Object(_)). Use LLMEngineOutput::encode_terminal(map) "
    "or .with_encoder_result(map) instead of LLMEngineOutput::stop(). Got finish_reason="
)


async def stream_of(*items: LLMEngineOutput | BaseException):
    for item in items:
        if isinstance(item, BaseException):
            raise item
        yield item


async def drain(stream) -> list[LLMEngineOutput]:
    return [item async for item in stream]


def test_s1_message_is_dynamos() -> None:
    assert S1_MESSAGE == (
        "LLMEngine contract violation: item yielded after terminal item "
        "(a chunk with finish_reason set, or an Err, must be the last item)"
    )
    assert issubclass(ContractViolation, AssertionError)


async def test_valid_stream_passes_through() -> None:
    items = [chunk.token(1), chunk.token(2), LLMEngineOutput.length().with_tokens([3])]
    assert await drain(validated(stream_of(*items))) == items


async def test_item_after_terminal_raises_s1() -> None:
    out: list[LLMEngineOutput] = []
    with pytest.raises(ContractViolation) as info:
        async for item in validated(
            stream_of(chunk.token(1), LLMEngineOutput.stop(), chunk.token(2))
        ):
            out.append(item)
    assert str(info.value) == S1_MESSAGE
    # The terminal itself was delivered before the violation was seen.
    assert [i.is_terminal for i in out] == [False, True]


async def test_second_terminal_raises_s1() -> None:
    with pytest.raises(ContractViolation, match="item yielded after terminal item"):
        await drain(validated(stream_of(LLMEngineOutput.stop(), LLMEngineOutput.length())))


async def test_exception_after_terminal_raises_s1() -> None:
    with pytest.raises(ContractViolation) as info:
        await drain(validated(stream_of(LLMEngineOutput.stop(), RuntimeError("late"))))
    assert str(info.value) == S1_MESSAGE
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_exception_as_terminal_is_not_a_violation() -> None:
    with pytest.raises(RuntimeError, match="engine failure"):
        await drain(validated(stream_of(chunk.token(1), RuntimeError("engine failure"))))


async def test_stream_without_terminal_is_not_the_validators_business() -> None:
    # S3 is the conformance kit's check; the adapter may break early on cancel.
    assert len(await drain(validated(stream_of(chunk.token(1))))) == 1


async def test_non_output_item_is_rejected() -> None:
    with pytest.raises(ContractViolation, match="must yield LLMEngineOutput"):
        await drain(validated(stream_of({"token_ids": [1]})))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "terminal",
    [
        LLMEngineOutput.stop(),
        LLMEngineOutput.length(),
        LLMEngineOutput.stop().with_encoder_result({}),
    ],
    ids=["stop", "length", "empty-object-ok"],
)
async def test_encode_mode_s2(terminal: LLMEngineOutput) -> None:
    stream = validated(stream_of(terminal), DisaggregationMode.ENCODE)
    if isinstance(terminal.encoder_result, dict):
        assert len(await drain(stream)) == 1
        return
    with pytest.raises(ContractViolation) as info:
        await drain(stream)
    assert str(info.value).startswith(S2_PREFIX)
    assert f"finish_reason={terminal.finish_reason.value}, encoder_result=None" in str(info.value)


async def test_encode_mode_accepts_encode_terminal_and_cancelled() -> None:
    ok = LLMEngineOutput.encode_terminal({"embeddings": "handle"})
    mode = DisaggregationMode.ENCODE
    assert await drain(validated(stream_of(ok), mode)) == [ok]
    assert len(await drain(validated(stream_of(LLMEngineOutput.cancelled()), mode))) == 1


@pytest.mark.parametrize(
    "mode", [DisaggregationMode.AGGREGATED, DisaggregationMode.PREFILL, DisaggregationMode.DECODE]
)
async def test_other_modes_are_exempt_from_s2(mode: DisaggregationMode) -> None:
    assert len(await drain(validated(stream_of(LLMEngineOutput.stop()), mode))) == 1


async def test_validator_closes_the_engine_stream_when_consumer_stops() -> None:
    closed = []

    async def engine():
        try:
            for i in range(100):
                yield chunk.token(i)
        finally:
            closed.append(True)

    wrapped = validated(engine())
    assert (await wrapped.__anext__()).token_ids == [0]
    await wrapped.aclose()
    assert closed == [True]


# -- switch -----------------------------------------------------------------------------------


def test_debug_validate_reads_dyn_debug_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = add_common_args(argparse.ArgumentParser())
    monkeypatch.delenv("DYN_DEBUG_VALIDATE", raising=False)
    assert not worker_config_from_args(parser.parse_args([])).debug_validate
    for on in ("1", "true", "YES", " on "):
        monkeypatch.setenv("DYN_DEBUG_VALIDATE", on)
        assert worker_config_from_args(parser.parse_args([])).debug_validate, on
    for off in ("0", "", "false", "no"):
        monkeypatch.setenv("DYN_DEBUG_VALIDATE", off)
        assert not worker_config_from_args(parser.parse_args([])).debug_validate, off


def test_disabled_returns_the_raw_stream_object() -> None:
    raw = stream_of(LLMEngineOutput.stop())
    assert maybe_validated(raw, on=False) is raw
    assert maybe_validated(raw, DisaggregationMode.ENCODE, on=False) is raw


async def test_enabled_raises_s1() -> None:
    stream = maybe_validated(stream_of(LLMEngineOutput.stop(), chunk.token(9)), on=True)
    with pytest.raises(ContractViolation) as info:
        await drain(stream)
    assert str(info.value) == S1_MESSAGE


async def test_enabled_raises_s2_in_encode_mode() -> None:
    stream = maybe_validated(stream_of(LLMEngineOutput.stop()), DisaggregationMode.ENCODE, on=True)
    with pytest.raises(ContractViolation) as info:
        await drain(stream)
    assert str(info.value).startswith(S2_PREFIX)


async def test_on_needs_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYN_DEBUG_VALIDATE", raising=False)
    with pytest.raises(ContractViolation):
        await drain(maybe_validated(stream_of(LLMEngineOutput.stop(), chunk.token(1)), on=True))
