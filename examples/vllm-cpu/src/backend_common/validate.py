"""Debug-mode stream validator (contract rules S1 and S2).

``validated(stream, mode)`` wraps an engine's ``generate`` stream and raises
``ContractViolation`` (an ``AssertionError``) with Dynamo's messages when

* S1: an item follows a terminal item (``finish_reason`` set, or an exception);
* S2: in encode mode, a terminal that is not ``cancelled`` lacks an object
  ``encoder_result``.

To see S1 the wrapper asks the engine for one more item after the terminal,
so it is a debug tool: on in the conformance kit and in test suites, on in a
worker only with ``WorkerConfig.debug_validate`` (``DYN_DEBUG_VALIDATE=1``). When
off, ``maybe_validated`` returns the engine's stream itself, so production pays
nothing per chunk. The rules themselves: ``docs/contract.md#stream-rules``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from .config import DisaggregationMode
from .streams import close_stream
from .types import FinishReason, LLMEngineOutput

__all__ = ["ContractViolation", "maybe_validated", "validated"]

S1_MESSAGE = (
    "LLMEngine contract violation: item yielded after terminal item "
    "(a chunk with finish_reason set, or an Err, must be the last item)"
)


class ContractViolation(AssertionError):
    """An engine broke a stream rule. Raised only when validation is on."""


def _check_encode_terminal(item: LLMEngineOutput) -> None:
    if item.finish_reason is FinishReason.CANCELLED:
        return
    if not isinstance(item.encoder_result, dict):
        raise ContractViolation(
            "Encode-mode contract violation: non-cancelled terminal chunk must carry "
            "encoder_result: Some(Value::Object(_)). Use LLMEngineOutput::encode_terminal(map) "
            "or .with_encoder_result(map) instead of LLMEngineOutput::stop(). "
            f"Got finish_reason={getattr(item.finish_reason, 'value', None)}, "
            f"encoder_result={item.encoder_result!r}"
        )


async def validated(
    stream: AsyncIterator[LLMEngineOutput],
    mode: DisaggregationMode = DisaggregationMode.AGGREGATED,
) -> AsyncIterator[LLMEngineOutput]:
    encode = mode is DisaggregationMode.ENCODE
    try:
        async for item in stream:
            if not isinstance(item, LLMEngineOutput):
                raise ContractViolation(
                    f"generate() must yield LLMEngineOutput items, got {type(item).__name__}"
                )
            if item.finish_reason is None:
                yield item
                continue
            if encode:
                _check_encode_terminal(item)
            yield item
            # The terminal must be last: the engine's stream has to end here.
            try:
                await stream.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:  # an error after a terminal is an item too
                raise ContractViolation(S1_MESSAGE) from exc
            raise ContractViolation(S1_MESSAGE)
    finally:
        await close_stream(stream)


def maybe_validated(
    stream: AsyncIterator[LLMEngineOutput],
    mode: DisaggregationMode = DisaggregationMode.AGGREGATED,
    *,
    on: bool,
) -> AsyncIterator[LLMEngineOutput]:
    """``validated(stream, mode)`` when ``on``, else ``stream`` itself (no cost per item)."""
    return validated(stream, mode) if on else stream
