"""Model card: CheckedFiles, URLs, topology per mode, runtime_config, errors, name-only cards."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest

from backend_common.config import EngineConfig, WorkerConfig
from backend_common.devstack.tinymodel import write_tiny_model
from backend_common.errors import BackendError, DynamoError
from backend_common.runtime.modelcard import (
    build_model_card,
    metadata_prefix,
    model_type_for,
    parse_endpoint_types,
    slugify,
)

ENGINE = EngineConfig(
    model="tiny",
    context_length=1024,
    kv_cache_block_size=32,
    total_kv_blocks=500,
    max_num_seqs=8,
    max_num_batched_tokens=4096,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("m") / "Tiny.Model")


def digest(path: Path) -> str:
    return "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()


def config(model_dir: Path | None, **kw) -> WorkerConfig:
    return WorkerConfig(model_name="tiny", model_path=str(model_dir) if model_dir else None, **kw)


def test_local_paths_checksums_and_sizes(model_dir: Path) -> None:
    mc = build_model_card(config(model_dir), ENGINE, base_url=None)
    card = mc.card
    entries = {
        "config.json": card["model_info"]["hf_config_json"],
        "tokenizer.json": card["tokenizer"]["hf_tokenizer_json"],
        "tokenizer_config.json": card["prompt_formatter"]["hf_tokenizer_config_json"],
        "generation_config.json": card["gen_config"]["hf_generation_config_json"],
        "special_tokens_map.json": card["extra_files"][0],
    }
    for name, cf in entries.items():
        path = model_dir / name
        assert cf == {"path": str(path), "checksum": digest(path), "size": path.stat().st_size}
        assert mc.files[name] == path
    assert set(mc.files) == set(entries)
    assert card["display_name"] == "tiny" and card["slug"] == "tiny"
    assert card["source_path"] == str(model_dir)
    assert card["model_input"] == "Tokens"
    assert card["model_type"] == "Chat | Completions"
    assert (card["worker_type"], card["needs"]) == ("aggregated", [])
    assert card["context_length"] == 1024
    assert card["architectural_max_context_length"] == 2048  # from config.json
    assert card["kv_cache_block_size"] == 32
    assert card["migration_limit"] == 0
    json.dumps(card)  # JSON-able as is


def test_http_urls_when_a_status_server_runs(model_dir: Path) -> None:
    cfg = config(model_dir, namespace="ns", component="comp", endpoint="ep")
    mc = build_model_card(cfg, ENGINE, base_url="http://127.0.0.1:9090/")
    assert mc.files_prefix == "/v1/metadata/ns/comp/ep/tiny/_base"
    assert mc.card["tokenizer"]["hf_tokenizer_json"]["path"] == (
        "http://127.0.0.1:9090/v1/metadata/ns/comp/ep/tiny/_base/tokenizer.json"
    )
    for cf in (mc.card["model_info"]["hf_config_json"], mc.card["extra_files"][0]):
        name = cf["path"].rsplit("/", 1)[1]
        assert cf["path"] == f"http://127.0.0.1:9090{mc.files_prefix}/{name}"
        assert cf["checksum"] == digest(model_dir / name)


def test_runtime_config(model_dir: Path) -> None:
    cfg = config(
        model_dir,
        tool_call_parser="hermes",
        reasoning_parser="qwen3",
        exclude_tools_when_tool_choice_none=False,
        structural_tag={"scope": "always"},
        migration_limit=3,
    )
    engine = EngineConfig(
        model="tiny",
        data_parallel_size=4,
        data_parallel_start_rank=2,
        runtime_data={"k": 1},
    )
    card = build_model_card(cfg, engine, base_url=None).card
    rc = card["runtime_config"]
    assert rc["tool_call_parser"] == "hermes" and rc["reasoning_parser"] == "qwen3"
    assert rc["exclude_tools_when_tool_choice_none"] is False
    assert (rc["structural_tag_mode"], rc["structural_tag_scope"]) == ("on", "always")
    assert rc["structural_tag_schema"] == "auto"
    assert (rc["data_parallel_size"], rc["data_parallel_start_rank"]) == (4, 2)
    assert rc["runtime_data"] == {"k": 1}
    assert rc["enable_local_indexer"] is True
    assert rc["total_kv_blocks"] is None  # not advertised by the engine
    # No engine context length: fall back to the architecture's maximum.
    assert rc["context_length"] == card["context_length"] == 2048
    assert card["kv_cache_block_size"] == 16 and card["migration_limit"] == 3


@pytest.mark.parametrize(
    "mode, model_type, worker_type, needs, indexer",
    [
        ("agg", "Chat | Completions", "aggregated", [], True),
        ("prefill", "Prefill", "prefill", [["decode"]], True),
        ("decode", "Chat | Completions", "decode", [["prefill"]], False),
        ("encode", "", "encode", [["prefill", "decode"], ["aggregated"]], False),
    ],
)
def test_topology_per_mode(model_dir, mode, model_type, worker_type, needs, indexer) -> None:
    card = build_model_card(config(model_dir, disaggregation_mode=mode), ENGINE, base_url=None).card
    assert card["model_type"] == model_type
    assert (card["worker_type"], card["needs"]) == (worker_type, needs)
    assert card["runtime_config"]["enable_local_indexer"] is indexer


def test_endpoint_types() -> None:
    assert parse_endpoint_types(" Completions, chat ,,chat") == ["Completions", "Chat"]
    assert parse_endpoint_types("embeddings") == ["Embedding"]
    # Printed in flag order whatever the input order.
    assert model_type_for(WorkerConfig(endpoint_types="completions,chat")) == "Chat | Completions"
    for bad, text in (("chat,bogus", "unknown endpoint type 'bogus'"), (" , ", "cannot be empty")):
        with pytest.raises(DynamoError) as err:
            parse_endpoint_types(bad)
        assert err.value.backend_error is BackendError.InvalidArgument
        assert text in err.value.message
    with pytest.raises(DynamoError, match="prefill"):
        parse_endpoint_types("prefill")


def test_slug_rules() -> None:
    assert slugify("/tmp/dq/tiny-model") == "tmp_dq_tiny-model"  # as the 1.6.1 runtime
    assert slugify("Qwen/Qwen3-0.6B") == "qwen_qwen3-0_6b"
    assert metadata_prefix("a b", "c", "e", "s") == "/v1/metadata/a%20b/c/e/s/_base"


def test_missing_tokenizer_file_is_invalid_argument(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(DynamoError) as err:
        build_model_card(config(broken), ENGINE, base_url=None)
    assert err.value.backend_error is BackendError.InvalidArgument
    assert "tokenizer.json" in err.value.message and str(broken) in err.value.message
    with pytest.raises(DynamoError, match="not a directory"):
        build_model_card(config(tmp_path / "nope"), ENGINE, base_url=None)
    (broken / "tokenizer.json").write_text("{}")
    (broken / "config.json").write_text("[1, 2")
    with pytest.raises(DynamoError, match="not valid JSON"):
        build_model_card(config(broken), ENGINE, base_url=None)


def test_name_only_card() -> None:
    mc = build_model_card(WorkerConfig(model_name="some/hub-model"), ENGINE, base_url=None)
    card = mc.card
    assert card["display_name"] == "some/hub-model" and card["slug"] == "some_hub-model"
    for key in ("tokenizer", "prompt_formatter", "model_info", "gen_config", "extra_files"):
        assert key not in card
    assert mc.files == {}
    assert card["model_type"] == "Chat | Completions" and card["context_length"] == 1024


def test_served_name_and_model_name_as_directory(model_dir: Path) -> None:
    cfg = WorkerConfig(model_name=str(model_dir), served_model_name="Public-Name")
    card = build_model_card(cfg, ENGINE, base_url=None).card
    assert card["display_name"] == "Public-Name" and card["slug"] == "public-name"
    assert card["tokenizer"]["hf_tokenizer_json"]["path"] == str(model_dir / "tokenizer.json")


def test_custom_chat_template(model_dir: Path, tmp_path: Path) -> None:
    tpl = tmp_path / "my.jinja"
    tpl.write_text("{{ messages[0]['content'] }}")
    mc = build_model_card(config(model_dir, custom_jinja_template=str(tpl)), ENGINE, base_url=None)
    entry = mc.card["chat_template_file"]["hf_chat_template"]
    assert entry["is_custom"] is True
    assert entry["file"] == {"path": str(tpl), "checksum": digest(tpl), "size": tpl.stat().st_size}
    assert mc.files["chat_template.jinja"] == tpl
    with pytest.raises(DynamoError, match="not found"):
        build_model_card(
            config(model_dir, custom_jinja_template=str(tmp_path / "x.jinja")),
            ENGINE,
            base_url=None,
        )
    # A template shipped in the model directory is used but is not "custom".
    (tmp_path / "m2").mkdir()
    for p in model_dir.iterdir():
        (tmp_path / "m2" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "m2" / "chat_template.jinja").write_text("x")
    card = build_model_card(config(tmp_path / "m2"), ENGINE, base_url=None).card
    assert card["chat_template_file"]["hf_chat_template"]["is_custom"] is False
