"""Request options reach the engine; worker options reach the model card as Dynamo publishes them.

Expected card values were captured from the real 1.6.1 sample backend
(``dynamo.common.backend`` Worker) started with the same settings: tool-call and reasoning
parsers verbatim in ``runtime_config``; a structural tag as ``runtime_config.structural_tag``
with its defaults filled in, plus ``structural_tag_mode: "on"`` and the scope/schema copies;
a custom chat template as ``chat_template_file.hf_chat_template`` with ``is_custom: true``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from adapter_harness import run_request
from conftest import Stack

from backend_common import GenerateContext, LLMEngineOutput, PreprocessedRequest
from backend_common.args import add_common_args, worker_config_from_args
from backend_common.config import EngineConfig
from backend_common.errors import DynamoError
from backend_common.reference import ReferenceEngine
from backend_common.runtime.adapter import EngineAdapter
from backend_common.runtime.modelcard import build_model_card

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


class RecordingEngine(ReferenceEngine):
    def __init__(self) -> None:
        super().__init__("opts-model")
        self.seen: list[PreprocessedRequest] = []

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        self.seen.append(request)
        async for item in super().generate(request, ctx):
            yield item


async def test_guided_decoding_and_dp_rank_reach_the_engine() -> None:
    engine = RecordingEngine()
    adapter = EngineAdapter(engine, engine_config=EngineConfig(model="opts-model"))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = {
        "token_ids": [1, 2],
        "stop_conditions": {"max_tokens": 2},
        "sampling_options": {"temperature": 0.5, "guided_decoding": {"json": schema}},
        "routing": {"dp_rank": 3, "prefill_dp_rank": 1},
    }
    out = await run_request(adapter, request)
    assert b"complete_final" in out
    (seen,) = engine.seen
    guided = seen.sampling_options.guided_decoding
    assert guided is not None and guided.json_schema == schema
    assert seen.sampling_options.temperature == 0.5
    assert seen.dp_rank == 3
    assert seen.routing.prefill_dp_rank == 1


def card_for(tiny_model, *argv: str, engine: EngineConfig | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser())
    config = worker_config_from_args(parser.parse_args(["--model-path", str(tiny_model), *argv]))
    return build_model_card(config, engine or EngineConfig(model="m"), base_url=None).card


def test_parsers_template_and_structural_tag_in_the_card(tiny_model, tmp_path) -> None:
    tpl = tmp_path / "custom.jinja"
    tpl.write_text(TEMPLATE)
    card = card_for(
        tiny_model,
        "--custom-jinja-template",
        str(tpl),
        "--dyn-tool-call-parser",
        "hermes",
        "--dyn-reasoning-parser",
        "deepseek_r1",
        "--dyn-structural-tag",
        json.dumps({"scope": "always", "schema": "auto"}),
    )
    rc = card["runtime_config"]
    assert rc["tool_call_parser"] == "hermes"
    assert rc["reasoning_parser"] == "deepseek_r1"
    assert rc["tool_call_arguments_format"] == "json_string"
    assert rc["structural_tag"] == {
        "scope": "always",
        "schema": "auto",
        "allow_tool_calls_with_structured_output": False,
        "reasoning_boundary": "auto",
        "tool_arguments_any_order": False,
    }
    assert (rc["structural_tag_mode"], rc["structural_tag_scope"]) == ("on", "always")
    assert rc["structural_tag_schema"] == "auto"
    entry = card["chat_template_file"]["hf_chat_template"]
    assert entry["is_custom"] is True
    assert entry["file"]["size"] == len(TEMPLATE)
    # Without the options: Dynamo's defaults.
    plain = card_for(tiny_model)["runtime_config"]
    assert plain["tool_call_parser"] is None and plain["reasoning_parser"] is None
    assert "structural_tag" not in plain
    assert (plain["structural_tag_mode"], plain["structural_tag_scope"]) == ("off", "auto")


@pytest.mark.parametrize(
    "value",
    [{"mode": "on"}, {"scope": "tools"}, {"schema": "bogus"}, {"tool_arguments_any_order": "x"}],
)
def test_invalid_structural_tag_is_a_typed_error(tiny_model, value) -> None:
    with pytest.raises(DynamoError) as info:
        card_for(tiny_model, "--dyn-structural-tag", json.dumps(value))
    assert info.value.is_invalid_argument


def test_data_parallel_ranks_are_advertised(tiny_model) -> None:
    engine = EngineConfig(model="m", data_parallel_size=4, data_parallel_start_rank=8)
    rc = card_for(tiny_model, engine=engine)["runtime_config"]
    assert (rc["data_parallel_size"], rc["data_parallel_start_rank"]) == (4, 8)
    rc = card_for(tiny_model)["runtime_config"]
    assert (rc["data_parallel_size"], rc["data_parallel_start_rank"]) == (1, 0)


@pytest.mark.e2e
async def test_frontend_renders_the_custom_template(make_stack, tmp_path) -> None:
    from backend_common.devstack.openai import chat

    tpl = tmp_path / "custom.jinja"
    tpl.write_text(TEMPLATE)
    stack: Stack = make_stack("file", "tcp")
    stack.serve("tiny-custom", "--custom-jinja-template", str(tpl))
    stack.serve("tiny-default")
    async with aiohttp.ClientSession() as session:
        base = stack.frontend.base_url
        custom = await chat(session, base, "tiny-custom", "w5 w6", max_tokens=1, stream=False)
        default = await chat(session, base, "tiny-default", "w5 w6", max_tokens=1, stream=False)
    assert custom.status == 200 and default.status == 200
    # The custom template renders the bare content: exactly the two words' tokens.
    assert custom.usage["prompt_tokens"] == 2
    assert default.usage["prompt_tokens"] > 2
