"""The values that cross the engine contract: PreprocessedRequest, LLMEngineOutput, FinishReason.

The captured bodies are the 1.6.1 frontend's and worker's own (from real processes); the
runtime must read them field for field and write what the frontend reads back.
"""

from __future__ import annotations

import copy
import json

import pydantic
import pytest

from backend_common.types import (
    U32_MAX,
    FinishReason,
    LLMEngineOutput,
    PreprocessedRequest,
    chunk,
    usage,
)

# Captured (a): NATS plane, msgpack body, decoded.
CAPTURED_REQUEST_A = json.loads(
    """{"model":"test-model","token_ids":[1001,1000,1000,5,6,1000,1000,1000],
 "stop_conditions":{"max_tokens":4,"stop":null,"stop_token_ids":null,"stop_token_ids_visible":null,
                    "stop_token_ids_hidden":[1002],"min_tokens":null,"ignore_eos":null,
                    "max_thinking_tokens":null},
 "sampling_options":{"n":null,"best_of":null,"presence_penalty":null,"frequency_penalty":null,
                     "repetition_penalty":null,"temperature":null,"top_p":null,"top_k":null,
                     "min_p":null,"use_beam_search":null,"length_penalty":null,"seed":null,
                     "include_stop_str_in_output":null,"guided_decoding":null},
 "output_options":{"logprobs":null,"prompt_logprobs":null,"skip_special_tokens":null,
                   "formatted_prompt":null,"return_tokens_as_token_ids":null},
 "eos_token_ids":[1002],
 "mdc_sum":"97be43526065c0f6046b920ede6ef87444cdcd4b24b2485d9c6c8f64dfb9a711",
 "annotations":[],"routing":{},"router_config_override":null}"""
)

# Captured (b): TCP plane, JSON body, with sampling and logprobs set by the client.
CAPTURED_REQUEST_B = json.loads(
    """{"model":"tiny-py","token_ids":[2001,2000,2000,1,2000,2000,21,22,2000,2000],
 "stop_conditions":{"max_tokens":3,"stop":["w99"],"stop_token_ids":null,
                    "stop_token_ids_visible":null,"stop_token_ids_hidden":[2002],
                    "min_tokens":null,"ignore_eos":null,"max_thinking_tokens":null},
 "sampling_options":{"n":null,"best_of":null,"presence_penalty":null,"frequency_penalty":null,
                     "repetition_penalty":null,"temperature":0.7,"top_p":0.9,"top_k":null,
                     "min_p":null,"use_beam_search":null,"length_penalty":null,"seed":42,
                     "include_stop_str_in_output":null,"guided_decoding":null},
 "output_options":{"logprobs":2,"prompt_logprobs":null,"skip_special_tokens":null,
                   "formatted_prompt":null,"return_tokens_as_token_ids":null},
 "eos_token_ids":[2002],
 "mdc_sum":"0b4cbe26c99bdca0d25b62e1c3e0e164d8b4d0270bd552ebb54efaf37ca3ef1e",
 "annotations":[],"routing":{},"router_config_override":null}"""
)

# Captured: the inner `Annotated.data` of the data frames of a real 1.6.1 worker.
CAPTURED_ITEMS = [
    json.loads(
        '{"token_ids":[1],"tokens":null,"text":null,"output_type":"text","cum_log_probs":null,'
        '"log_probs":null,"top_logprobs":null,"finish_reason":null,"index":0}'
    ),
    json.loads(
        '{"token_ids":[2],"tokens":null,"text":null,"output_type":"text","cum_log_probs":null,'
        '"log_probs":null,"top_logprobs":null,"finish_reason":null,"index":0}'
    ),
    json.loads(
        '{"token_ids":[3],"tokens":null,"text":null,"output_type":"text","cum_log_probs":null,'
        '"log_probs":null,"top_logprobs":null,"finish_reason":"length","index":0,'
        '"completion_usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}'
    ),
]


def test_public_imports() -> None:
    import backend_common
    from backend_common import (  # noqa: F401
        EngineConfig,
        FinishReason,
        GenerateContext,
        LLMEngine,
        LLMEngineOutput,
        PreprocessedRequest,
        WorkerConfig,
        chunk,
        usage,
    )

    # `run` is loaded lazily (it imports the whole worker) and is tested with the worker.
    for name in set(backend_common.__all__) - {"run"}:
        assert getattr(backend_common, name) is not None, name


# -- PreprocessedRequest ----------------------------------------------------------------------


@pytest.mark.parametrize("captured", [CAPTURED_REQUEST_A, CAPTURED_REQUEST_B], ids=["a", "b"])
def test_captured_request_round_trips_field_for_field(captured: dict) -> None:
    original = copy.deepcopy(captured)
    request = PreprocessedRequest.from_dict(captured)
    assert request.to_dict() == original
    assert captured == original, "from_dict must not mutate its input"
    # Through JSON as well, since that is what the transport does with it.
    assert json.loads(json.dumps(request.to_dict())) == original


def test_captured_request_fields_are_readable() -> None:
    a = PreprocessedRequest.from_dict(CAPTURED_REQUEST_A)
    assert a.model == "test-model"
    assert a.token_ids == [1001, 1000, 1000, 5, 6, 1000, 1000, 1000]
    assert a.max_tokens == a.stop_conditions.max_tokens == 4
    assert a.stop_conditions.stop_token_ids_hidden == [1002]
    assert a.eos_token_ids == [1002]
    assert a.routing is not None and a.routing.dp_rank is None and a.dp_rank is None
    assert a.is_probe is False

    b = PreprocessedRequest.from_dict(CAPTURED_REQUEST_B)
    assert b.sampling_options.temperature == pytest.approx(0.7)
    assert b.sampling_options.top_p == pytest.approx(0.9)
    assert b.sampling_options.seed == 42
    assert b.output_options.logprobs == 2
    assert b.stop_conditions.stop == ["w99"]


def test_missing_fields_are_defaulted() -> None:
    request = PreprocessedRequest.from_dict({"token_ids": [5, 6]})
    assert request.model == ""
    assert request.stop_conditions.max_tokens is None
    assert request.sampling_options.temperature is None
    assert request.output_options.logprobs is None
    assert request.eos_token_ids == [] and request.annotations == []
    assert request.routing is None and request.dp_rank is None
    assert request.prefill_result is None and request.bootstrap_info is None
    assert request.is_probe is False
    # Nothing that was not received is invented on the way out.
    assert request.to_dict() == {"token_ids": [5, 6]}


def test_unknown_fields_are_kept_at_every_level() -> None:
    body = copy.deepcopy(CAPTURED_REQUEST_A)
    body["kv_hint"] = {"a": 1}
    body["request_timestamp_ms"] = 1.5
    body["stop_conditions"]["no_stop_trim"] = True
    body["sampling_options"]["future_knob"] = [1, 2]
    body["output_options"]["no_stop_trim"] = False
    body["routing"] = {"dp_rank": 1, "priority": 3, "allowed_worker_ids": [7]}
    request = PreprocessedRequest.from_dict(body)
    assert request.to_dict() == body


def test_guided_decoding_lives_in_sampling_options() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {
        "token_ids": [1],
        "sampling_options": {
            "temperature": 0.0,
            "guided_decoding": {"json": schema, "backend": "xgrammar", "new_field": 1},
        },
    }
    request = PreprocessedRequest.from_dict(body)
    guided = request.sampling_options.guided_decoding
    assert guided is not None
    assert guided.json_schema == schema
    assert guided.backend == "xgrammar" and guided.regex is None and guided.choice is None
    assert request.to_dict() == body

    choice = PreprocessedRequest.from_dict(
        {"token_ids": [1], "sampling_options": {"guided_decoding": {"choice": ["a", "b"]}}}
    )
    assert choice.sampling_options.guided_decoding.choice == ["a", "b"]


def test_routing_dp_rank_prefill_result_and_bootstrap_info() -> None:
    body = {
        "token_ids": [1, 2],
        "routing": {"dp_rank": 3, "prefill_worker_id": 42, "lora_name": "l"},
        "prefill_result": {"disaggregated_params": {"handle": "h", "blocks": [1, 2]}},
        "bootstrap_info": {
            "bootstrap_host": "10.0.0.1",
            "bootstrap_port": 8998,
            "bootstrap_room": 17,
        },
    }
    request = PreprocessedRequest.from_dict(body)
    assert request.routing.dp_rank == 3 and request.dp_rank == 3
    assert request.routing.prefill_worker_id == 42
    assert request.prefill_result.disaggregated_params == {"handle": "h", "blocks": [1, 2]}
    assert request.bootstrap_info.bootstrap_host == "10.0.0.1"
    assert request.bootstrap_info.bootstrap_port == 8998
    assert request.bootstrap_info.bootstrap_room == 17
    assert request.to_dict() == body


def test_health_check_alias() -> None:
    probe = PreprocessedRequest.from_dict({"token_ids": [1], "_HEALTH_CHECK": True})
    assert probe.is_probe is True
    assert probe.to_dict() == {"token_ids": [1], "_HEALTH_CHECK": True}
    # Built in code by the Python name, it still goes on the wire under the alias.
    assert PreprocessedRequest(token_ids=[1], is_probe=True).to_dict()["_HEALTH_CHECK"] is True


@pytest.mark.parametrize(
    "body",
    [
        {},  # token_ids is required
        {"token_ids": "1 2 3"},
        {"token_ids": [1, "x"]},
        {"token_ids": ["1"]},  # serde does not coerce strings into u32
        {"token_ids": [1.5]},
        {"token_ids": [True]},
        {"token_ids": [-1]},
        {"token_ids": [U32_MAX + 1]},
        {"token_ids": [1], "model": 5},
        {"token_ids": [1], "stop_conditions": {"max_tokens": "many"}},
        {"token_ids": [1], "stop_conditions": {"max_tokens": -1}},
        {"token_ids": [1], "stop_conditions": []},
        {"token_ids": [1], "sampling_options": {"temperature": "hot"}},
        {"token_ids": [1], "sampling_options": {"guided_decoding": {"choice": "a"}}},
        {"token_ids": [1], "output_options": {"logprobs": "2"}},
        {"token_ids": [1], "routing": {"dp_rank": "0"}},
        {"token_ids": [1], "eos_token_ids": [None]},
        {"token_ids": [1], "_HEALTH_CHECK": "true"},  # the marker is a strict bool
        {"token_ids": [1], "encoder_result": [1, 2]},  # must be a JSON object
    ],
)
def test_wrong_types_raise_validation_error(body: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        PreprocessedRequest.from_dict(body)


def test_validation_error_maps_to_invalid_argument() -> None:
    from backend_common.errors import BackendError, from_exception

    with pytest.raises(pydantic.ValidationError) as info:
        PreprocessedRequest.from_dict({"token_ids": "nope"})
    assert from_exception(info.value).backend_error is BackendError.InvalidArgument


# -- LLMEngineOutput --------------------------------------------------------------------------


@pytest.mark.parametrize("captured", CAPTURED_ITEMS, ids=["item1", "item2", "terminal"])
def test_captured_items_parse_and_minimal_form(captured: dict) -> None:
    item = LLMEngineOutput.from_dict(captured)
    assert item.token_ids == captured["token_ids"]
    assert item.index == 0
    expected = {
        k: v
        for k, v in captured.items()
        if v is not None and not (k == "output_type" and v == "text")
    }
    assert item.to_dict() == expected


def test_captured_terminal_fields() -> None:
    terminal = LLMEngineOutput.from_dict(CAPTURED_ITEMS[2])
    assert terminal.is_terminal and terminal.finish_reason is FinishReason.LENGTH
    assert terminal.completion_usage == usage(3, 3)
    assert not LLMEngineOutput.from_dict(CAPTURED_ITEMS[0]).is_terminal


def test_minimal_form_parses_back() -> None:
    for captured in CAPTURED_ITEMS:
        item = LLMEngineOutput.from_dict(captured)
        assert LLMEngineOutput.from_dict(item.to_dict()) == item
    assert LLMEngineOutput.from_dict({"token_ids": [21], "index": 0}).to_dict() == {
        "token_ids": [21],
        "index": 0,
    }


def test_media_output_type_is_kept() -> None:
    item = LLMEngineOutput.from_dict({"token_ids": [], "output_type": "image"})
    assert item.to_dict() == {"token_ids": [], "output_type": "image"}


def test_all_1_6_1_fields_are_accepted() -> None:
    full = {
        "token_ids": [7],
        "tokens": ["a"],
        "text": "a",
        "output_type": "text",
        "content_parts": None,
        "cum_log_probs": -0.5,
        "log_probs": [-0.5],
        "top_logprobs": [[{"rank": 1, "token_id": 7, "token": "a", "logprob": -0.5}]],
        "finish_reason": "stop",
        "stop_reason": "w99",
        "index": 0,
        "disaggregated_params": {"h": 1},
        "encoder_result": {"e": 2},
        "worker_trace_link": None,
        "extra_args": {"x": 1},
        "completion_usage": usage(1, 1),
        "engine_data": {"k": "v"},
        "routing_data": None,
        "jailed_text": None,
    }
    item = LLMEngineOutput.from_dict(full)
    out = item.to_dict()
    for key in (
        "tokens",
        "text",
        "cum_log_probs",
        "log_probs",
        "top_logprobs",
        "stop_reason",
        "disaggregated_params",
        "encoder_result",
        "extra_args",
        "engine_data",
    ):
        assert out[key] == full[key], key
    assert out["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2],
        {"token_ids": [1], "bogus": 1},
        {"token_ids": "12"},
        {"token_ids": [1, "2"]},
        {"token_ids": [-3]},
        {"token_ids": [], "finish_reason": "exploded"},
        {"token_ids": [], "finish_reason": {"oops": "x"}},
        {"token_ids": [], "finish_reason": 3},
    ],
)
def test_invalid_chunk_shape_is_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid chunk shape"):
        LLMEngineOutput.from_dict(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "reason", "wire"),
    [
        (LLMEngineOutput.stop, FinishReason.STOP, "stop"),
        (LLMEngineOutput.length, FinishReason.LENGTH, "length"),
        (LLMEngineOutput.cancelled, FinishReason.CANCELLED, "cancelled"),
        (LLMEngineOutput.eos, FinishReason.EOS, "eos"),
    ],
)
def test_terminal_constructors(make, reason: FinishReason, wire: str) -> None:
    item = make()
    assert item.is_terminal and item.finish_reason is reason
    assert item.token_ids == [] and item.completion_usage is None and item.index is None
    assert item.to_dict() == {"token_ids": [], "finish_reason": wire}


def test_error_terminal_is_the_newtype_variant_on_the_wire() -> None:
    item = LLMEngineOutput.error("engine exploded")
    assert item.is_terminal and item.finish_reason is FinishReason.ERROR
    assert item.to_dict() == {"token_ids": [], "finish_reason": {"error": "engine exploded"}}
    back = LLMEngineOutput.from_dict(item.to_dict())
    assert back.finish_reason is FinishReason.ERROR and back.error_message == "engine exploded"


def test_fluent_setters_and_chunk_token() -> None:
    item = LLMEngineOutput.length().with_tokens([4, 5]).with_usage(usage(3, 5))
    assert item.to_dict() == {
        "token_ids": [4, 5],
        "finish_reason": "length",
        "completion_usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }
    tokens = [9]
    replaced = chunk.token(1).with_tokens(tokens)
    tokens.append(10)
    assert replaced.token_ids == [9], "with_tokens copies (replace, not alias)"

    tok = chunk.token(42)
    assert tok.to_dict() == {"token_ids": [42]}
    assert not tok.is_terminal and tok.completion_usage is None
    assert chunk.tokens([1, 2]).to_dict() == {"token_ids": [1, 2]}


def test_encode_terminal() -> None:
    item = LLMEngineOutput.encode_terminal({"embedding": [0.5]})
    assert item.to_dict() == {
        "token_ids": [],
        "finish_reason": "stop",
        "index": 0,
        "encoder_result": {"embedding": [0.5]},
    }
    with pytest.raises(TypeError):
        LLMEngineOutput.encode_terminal([1])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LLMEngineOutput.stop().with_encoder_result("x")  # type: ignore[arg-type]


def test_usage_saturates_at_u32_max() -> None:
    assert usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert usage(U32_MAX, 1)["total_tokens"] == U32_MAX
    assert usage(U32_MAX - 1, 1)["total_tokens"] == U32_MAX
    assert usage(U32_MAX, U32_MAX)["total_tokens"] == U32_MAX == 4294967295


# -- FinishReason -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "member"),
    [
        ("eos", FinishReason.EOS),
        ("length", FinishReason.LENGTH),
        ("stop", FinishReason.STOP),
        ("error", FinishReason.ERROR),
        ("cancelled", FinishReason.CANCELLED),
        ("content_filter", FinishReason.CONTENT_FILTER),
        ("abort", FinishReason.CANCELLED),
    ],
)
def test_finish_reason_values(wire: str, member: FinishReason) -> None:
    assert FinishReason(wire) is member
    assert LLMEngineOutput(finish_reason=wire).finish_reason is member


def test_finish_reason_wire_strings_and_abort_alias() -> None:
    assert {m.value for m in FinishReason} == {
        "eos",
        "length",
        "stop",
        "error",
        "cancelled",
        "content_filter",
    }
    # "abort" (what Dynamo's Python engines yield) is read as cancelled and written as such.
    item = LLMEngineOutput.from_dict({"token_ids": [], "finish_reason": "abort"})
    assert item.finish_reason is FinishReason.CANCELLED
    assert item.to_dict()["finish_reason"] == "cancelled"
    with pytest.raises(ValueError):
        FinishReason("finished")


def test_encoder_result_must_be_an_object() -> None:
    body = {"token_ids": [1], "encoder_result": {"embeddings": "handle", "shape": [1, 4]}}
    request = PreprocessedRequest.from_dict(body)
    assert request.encoder_result == {"embeddings": "handle", "shape": [1, 4]}
    assert request.to_dict() == body
    with pytest.raises(pydantic.ValidationError, match="encoder_result"):
        PreprocessedRequest.from_dict({"token_ids": [1], "encoder_result": "handle"})


def test_enum_strings_are_their_wire_values() -> None:
    # Logs and messages format these enums; they must read as the wire string.
    assert str(FinishReason.CANCELLED) == f"{FinishReason.CANCELLED}" == "cancelled"


def test_plain_token_ids_only_for_items_that_carry_nothing_else() -> None:
    from backend_common.types import LLMEngineOutput, chunk, usage

    assert chunk.token(7).plain_token_ids() == [7]
    assert chunk.tokens([1, 2]).plain_token_ids() == [1, 2]
    assert LLMEngineOutput([]).plain_token_ids() == []
    others = [
        LLMEngineOutput.length().with_tokens([1]),
        LLMEngineOutput([1]).with_usage(usage(1, 1)),
        LLMEngineOutput([1], index=0),
        LLMEngineOutput([1], text="w1"),
        LLMEngineOutput([1], output_type="image"),
        LLMEngineOutput([1], log_probs=[-0.1]),
    ]
    for item in others:
        assert item.plain_token_ids() is None, item
