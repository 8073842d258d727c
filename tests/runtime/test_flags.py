"""Dynamo's worker flags next to an engine's own: vLLM's and SGLang's flag sets, both orders.

The engine parsers below carry the option strings (and the argparse shapes) of
``vllm serve`` and ``python -m sglang.launch_server`` that overlap with a Dynamo worker's
command line. Whatever the order of ``add_common_args`` and the engine's flags, the parser
builds, the engine's definition wins, and ``worker_config_from_args`` reads the setting
from it; Dynamo's 1.6.1 spellings (``--dyn-tool-call-parser``...) always work.
"""

from __future__ import annotations

import argparse
import logging

import pytest

from backend_common.args import add_common_args, worker_config_from_args
from backend_common.errors import DynamoError


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("vLLM")
    g.add_argument("--model", type=str, default="Qwen/Qwen3-0.6B")
    g.add_argument("--served-model-name", nargs="+", type=str, default=None)
    g.add_argument("--tool-call-parser", type=str, default=None)
    g.add_argument("--reasoning-parser", type=str, default="")
    g.add_argument("--enable-auto-tool-choice", action="store_true", default=False)
    g.add_argument("--host", type=str, default=None)
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max-model-len", type=int, default=None)


def add_sglang_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", "--model", type=str, required=False)
    parser.add_argument("--tokenizer-path", type=str, default=None)
    parser.add_argument("--served-model-name", type=str, default=None)
    parser.add_argument("--tool-call-parser", type=str, default=None)
    parser.add_argument("--reasoning-parser", type=str, default=None)
    parser.add_argument("--host", type=str, default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "DYN_TOOL_CALL_PARSER",
        "DYN_REASONING_PARSER",
        "DYN_STRUCTURAL_TAG",
        "DYN_EXCLUDE_TOOLS_WHEN_TOOL_CHOICE_NONE",
        "DYN_MODEL_NAME",
        "DYN_MIGRATION_LIMIT",
        "DYN_SYSTEM_PORT",
        "DYN_NAMESPACE",
    ):
        monkeypatch.delenv(name, raising=False)


def build(engine_flags, *, engine_first: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    if engine_first:
        engine_flags(parser)
        add_common_args(parser)
    else:
        add_common_args(parser)
        engine_flags(parser)
    return parser


@pytest.mark.parametrize("engine_first", [True, False], ids=["engine-first", "engine-after"])
def test_sglang_flag_set_parses_and_feeds_the_worker(engine_first: bool) -> None:
    parser = build(add_sglang_flags, engine_first=engine_first)
    args = parser.parse_args(
        [
            "--model-path",
            "/models/qwen",
            "--served-model-name",
            "qwen-public",
            "--tool-call-parser",
            "qwen25",
            "--reasoning-parser",
            "deepseek-r1",
            "--port",
            "31000",
            "--namespace",
            "team",
        ]
    )
    config = worker_config_from_args(args)
    assert config.model_path == "/models/qwen"
    assert config.served_model_name == "qwen-public"
    assert config.public_name == "qwen-public"
    assert (config.tool_call_parser, config.reasoning_parser) == ("qwen25", "deepseek-r1")
    assert config.namespace == "team"
    assert args.port == 31000  # the engine's own flag, untouched


@pytest.mark.parametrize("engine_first", [True, False], ids=["engine-first", "engine-after"])
def test_vllm_flag_set_parses_and_feeds_the_worker(engine_first: bool) -> None:
    parser = build(add_vllm_flags, engine_first=engine_first)
    args = parser.parse_args(
        [
            "--model",
            "/models/llama",
            "--served-model-name",
            "llama-a",
            "llama-b",
            "--tool-call-parser",
            "llama3_json",
            "--enable-auto-tool-choice",
            "--host",
            "0.0.0.0",
        ]
    )
    config = worker_config_from_args(args)
    assert config.model_path == "/models/llama"  # vLLM's --model names the model directory
    assert config.served_model_name == "llama-a"  # the first of vLLM's names is the public one
    assert config.tool_call_parser == "llama3_json"
    assert config.reasoning_parser is None  # vLLM's default "" is not a parser
    assert args.host == "0.0.0.0" and args.enable_auto_tool_choice


@pytest.mark.parametrize("engine_first", [True, False], ids=["engine-first", "engine-after"])
def test_dynamo_spellings_win_over_the_engine_flags(engine_first: bool) -> None:
    parser = build(add_sglang_flags, engine_first=engine_first)
    args = parser.parse_args(
        [
            "--tool-call-parser",
            "engine-parser",
            "--dyn-tool-call-parser",
            "hermes",
            "--dyn-reasoning-parser",
            "qwen3",
        ]
    )
    config = worker_config_from_args(args)
    assert (config.tool_call_parser, config.reasoning_parser) == ("hermes", "qwen3")
    assert args.tool_call_parser == "engine-parser"  # the engine still sees its own value


def test_engine_flag_given_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_TOOL_CALL_PARSER", "from-env")
    parser = build(add_sglang_flags, engine_first=True)
    assert worker_config_from_args(parser.parse_args([])).tool_call_parser == "from-env"
    args = parser.parse_args(["--tool-call-parser", "from-flag"])
    assert worker_config_from_args(args).tool_call_parser == "from-flag"


def test_1_6_1_names_and_hidden_old_spellings(caplog: pytest.LogCaptureFixture) -> None:
    parser = add_common_args(argparse.ArgumentParser())
    text = parser.format_help()
    for name in (
        "--dyn-tool-call-parser",
        "--dyn-reasoning-parser",
        "--dyn-structural-tag",
        "--exclude-tools-when-tool-choice-none",
        "--no-exclude-tools-when-tool-choice-none",
    ):
        assert name in text
    for old in ("--tool-call-parser", "--reasoning-parser", "--structural-tag "):
        assert old not in text  # hidden aliases
    with caplog.at_level(logging.WARNING, logger="backend_common.args.flags"):
        args = parser.parse_args(
            [
                "--tool-call-parser",
                "hermes",
                "--reasoning-parser",
                "qwen3",
                "--structural-tag",
                '{"scope": "auto"}',
                "--no-exclude-tools-when-tool-choice-none",
            ]
        )
    config = worker_config_from_args(args)
    assert (config.tool_call_parser, config.reasoning_parser) == ("hermes", "qwen3")
    assert config.structural_tag == {"scope": "auto"}
    assert config.exclude_tools_when_tool_choice_none is False
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "--tool-call-parser is deprecated; use --dyn-tool-call-parser" in warned
    assert "--structural-tag is deprecated; use --dyn-structural-tag" in warned


def test_structural_tag_true_false_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = add_common_args(argparse.ArgumentParser())
    assert worker_config_from_args(parser.parse_args(["--dyn-structural-tag"])).structural_tag == {}
    off = worker_config_from_args(parser.parse_args(["--dyn-structural-tag", "false"]))
    assert off.structural_tag is None
    monkeypatch.setenv("DYN_EXCLUDE_TOOLS_WHEN_TOOL_CHOICE_NONE", "false")
    monkeypatch.setenv("DYN_STRUCTURAL_TAG", '{"schema": "strict"}')
    parser = add_common_args(argparse.ArgumentParser())
    config = worker_config_from_args(parser.parse_args([]))
    assert config.structural_tag == {"schema": "strict"}
    assert config.exclude_tools_when_tool_choice_none is False


def test_frontend_env_names_do_not_reach_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """DYN_MODEL_NAME and DYN_MIGRATION_LIMIT are the 1.6.1 frontend's, not the worker's."""
    monkeypatch.setenv("DYN_MODEL_NAME", "frontend-model")
    monkeypatch.setenv("DYN_MIGRATION_LIMIT", "7")
    monkeypatch.setenv("DYN_MODEL_PATH", "/frontend/path")
    config = worker_config_from_args(add_common_args(argparse.ArgumentParser()).parse_args([]))
    assert config.model_name == "" and config.model_path is None
    assert config.migration_limit == 0


@pytest.mark.parametrize(("raw", "port"), [("-1", None), ("0", 0), ("9090", 9090)])
def test_system_port_minus_one_means_no_status_server(
    monkeypatch: pytest.MonkeyPatch, raw: str, port: int | None
) -> None:
    monkeypatch.setenv("DYN_SYSTEM_PORT", raw)
    config = worker_config_from_args(add_common_args(argparse.ArgumentParser()).parse_args([]))
    assert config.system_port == port


@pytest.mark.parametrize("engine_first", [True, False], ids=["engine-first", "engine-after"])
def test_unresolvable_conflict_is_one_line_naming_both(engine_first: bool) -> None:
    def engine(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--namespace", action="store_true", help="engine's boolean")

    with pytest.raises(DynamoError) as info:
        build(engine, engine_first=engine_first)
    message = str(info.value)
    assert "\n" not in message
    assert "the engine defines --namespace (takes no value" in message
    assert "the Dynamo worker defines --namespace (takes a value" in message


def test_conflicts_between_engine_flags_stay_argparse_errors() -> None:
    parser = add_common_args(argparse.ArgumentParser())
    parser.add_argument("--engine-flag")
    with pytest.raises(argparse.ArgumentError):
        parser.add_argument("--engine-flag")


def test_run_reports_an_unresolvable_conflict_in_one_line() -> None:
    """Through ``run()``: exit code 2 and one ``error:`` line naming both definitions."""
    import os
    import subprocess
    import sys

    from conftest import RUNTIME_SRC

    code = (
        "import argparse\n"
        "from backend_common import run\n"
        "from backend_common.args import add_common_args, worker_config_from_args\n"
        "from backend_common.reference import ReferenceEngine\n"
        "class Engine(ReferenceEngine):\n"
        "    @classmethod\n"
        "    def from_args(cls, argv=None):\n"
        "        parser = argparse.ArgumentParser()\n"
        "        add_common_args(parser)\n"
        "        parser.add_argument('--endpoint', action='store_true')\n"
        "        return cls(), worker_config_from_args(parser.parse_args(argv))\n"
        "run(Engine, [])\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(RUNTIME_SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert "the engine defines --endpoint (takes no value" in errors[0]
    assert "the Dynamo worker defines --endpoint (takes a value" in errors[0]
