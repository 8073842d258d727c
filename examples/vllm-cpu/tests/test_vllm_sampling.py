"""Dynamo requests to vLLM ``SamplingParams``: the exact mapping and the typed refusals.

Pure mapping (``vllm_engine.sampling``): no engine is started, so these run in ``make unit``.
"""

from __future__ import annotations

from typing import Any

import pytest
from backend_common import PreprocessedRequest
from backend_common.errors import DynamoError
from vllm.sampling_params import RequestOutputKind

from vllm_cpu_backend.vllm_engine.sampling import Limits, sampling_params

LIMITS = Limits(context_length=64, vocab_size=500, structured_outputs_backend="xgrammar")


def request(prompt_len: int = 4, **fields: Any) -> PreprocessedRequest:
    return PreprocessedRequest.model_validate({"token_ids": [1] * prompt_len, **fields})


def test_sampling_options_map_one_to_one() -> None:
    options = {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.05,
        "seed": 11,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repetition_penalty": 1.1,
    }
    params = sampling_params(request(sampling_options=options), LIMITS)
    for name, value in options.items():
        assert getattr(params, name) == pytest.approx(value), name
    assert params.n == 1
    assert params.detokenize is False
    assert params.output_kind is RequestOutputKind.DELTA


def test_stop_conditions_map_and_max_tokens_is_clamped_to_the_context() -> None:
    stop = {
        "max_tokens": 1000,
        "min_tokens": 3,
        "ignore_eos": True,
        "stop_token_ids_hidden": [7, 9],
        "stop_token_ids": [9, 11],
        "stop": ["never sent to vLLM"],
    }
    params = sampling_params(request(10, stop_conditions=stop), LIMITS)
    assert params.max_tokens == 64 - 10
    assert params.min_tokens == 3 and params.ignore_eos is True
    assert sorted(params.stop_token_ids) == [7, 9, 11]
    assert not params.stop  # stop strings stay with the frontend
    assert sampling_params(request(10), LIMITS).max_tokens == 54  # absent: all that fits


def test_output_options_ask_vllm_for_logprobs() -> None:
    params = sampling_params(request(output_options={"logprobs": 3, "prompt_logprobs": 1}), LIMITS)
    assert params.logprobs == 3 and params.prompt_logprobs == 1


@pytest.mark.parametrize(
    ("guided", "field"),
    [
        ({"regex": "[0-9]{3}"}, "regex"),
        ({"choice": ["a", "b"]}, "choice"),
        ({"json": {"type": "object"}}, "json"),
        ({"grammar": 'root ::= "x"'}, "grammar"),
    ],
)
def test_guided_decoding_becomes_structured_outputs(guided: dict[str, Any], field: str) -> None:
    params = sampling_params(request(sampling_options={"guided_decoding": guided}), LIMITS)
    assert params.structured_outputs is not None
    assert getattr(params.structured_outputs, field) == next(iter(guided.values()))


@pytest.mark.parametrize(
    "fields",
    [
        {"sampling_options": {"n": 2}},
        {"sampling_options": {"best_of": 3}},
        {"sampling_options": {"use_beam_search": True}},
        {"sampling_options": {"length_penalty": 0.5}},
        {"sampling_options": {"top_p": 5.0}},
        {"sampling_options": {"temperature": -1.0}},
        {"sampling_options": {"guided_decoding": {"regex": "a", "choice": ["a"]}}},
        {"sampling_options": {"guided_decoding": {"regex": "a", "backend": "outlines"}}},
        {"stop_conditions": {"max_thinking_tokens": 8}},
        {"stop_conditions": {"max_tokens": 4, "min_tokens": 8}},
        {"output_options": {"logprobs": 1000}},
    ],
    ids=lambda f: next(iter(next(iter(f.values())))),
)
def test_what_vllm_cannot_honour_is_invalid_argument(fields: dict[str, Any]) -> None:
    with pytest.raises(DynamoError) as info:
        sampling_params(request(**fields), LIMITS)
    assert info.value.is_invalid_argument


@pytest.mark.parametrize("prompt_len", [0, 64, 65])
def test_a_prompt_that_leaves_no_room_is_invalid_argument(prompt_len: int) -> None:
    with pytest.raises(DynamoError) as info:
        sampling_params(request(prompt_len), LIMITS)
    assert info.value.is_invalid_argument
