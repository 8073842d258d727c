"""vLLM's flags and Dynamo's on one command line, meaning what they mean in ``dynamo.vllm``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vllm_cpu_backend.engine import VllmCpuBackendEngine


def build(*argv: str) -> tuple[Any, Any]:
    return VllmCpuBackendEngine.from_args(list(argv))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing here may reach the hub: a lookup would fail, not download.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("DYN_MODEL_NAME", "DYN_MODEL_PATH", "DYN_DISAGGREGATION_MODE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("flag", ["--model", "--model-path"])
def test_either_model_flag_names_the_model(tmp_path: Path, flag: str) -> None:
    engine, config = build(flag, str(tmp_path), "--served-model-name", "m")
    assert engine.engine_args.model == str(tmp_path) == config.model_path
    assert config.public_name == "m"


def test_vllm_engine_flags_pass_through(tmp_path: Path) -> None:
    argv = ["--model", str(tmp_path), "--max-model-len", "256", "--enforce-eager"]
    engine, _config = build(*argv, "--dtype", "float32", "--max-num-seqs", "8")
    args = engine.engine_args
    assert args.max_model_len == 256 and args.enforce_eager is True
    assert args.dtype == "float32" and args.max_num_seqs == 8


def test_prefix_caching_and_kv_events_are_on_unless_turned_off(tmp_path: Path) -> None:
    engine, _config = build("--model", str(tmp_path))
    events = engine.engine_args.kv_events_config
    assert engine.engine_args.enable_prefix_caching is True
    assert events is not None and events.enable_kv_cache_events and events.publisher == "zmq"
    off, _config = build("--model", str(tmp_path), "--disable-kv-routing")
    assert off.engine_args.kv_events_config is None
    nocache, _config = build("--model", str(tmp_path), "--no-enable-prefix-caching")
    assert nocache.engine_args.enable_prefix_caching is False
    assert nocache.engine_args.kv_events_config is None
