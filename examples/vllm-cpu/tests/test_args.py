"""The worker's command line: shared Dynamo flags, the generated defaults, the roles served."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from backend_common import DisaggregationMode, DynamoError, WorkerConfig

from vllm_cpu_backend.args import DEFAULT_REQUEST_PLANE, SUPPORTED_MODES, from_args
from vllm_cpu_backend.engine import VllmCpuBackendEngine

OTHER_PLANE = {"tcp": "nats", "nats": "tcp"}[DEFAULT_REQUEST_PLANE]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags must decide, not whatever DYN_* the developer's shell exports."""
    for name in ("DYN_REQUEST_PLANE", "DYN_DISAGGREGATION_MODE", "DYN_MODEL_NAME"):
        monkeypatch.delenv(name, raising=False)


def test_from_args_builds_the_engine_and_its_config() -> None:
    engine, config = VllmCpuBackendEngine.from_args(["--model-name", "my-model"])
    assert isinstance(engine, VllmCpuBackendEngine)
    assert isinstance(config, WorkerConfig)
    assert config.model_name == "my-model"
    assert config.disaggregation_mode is DisaggregationMode.AGGREGATED


def test_module_from_args_is_the_engine_from_args() -> None:
    engine, config = from_args(["--model-name", "m", "--namespace", "team"])
    assert isinstance(engine, VllmCpuBackendEngine)
    assert config.namespace == "team"


def test_request_plane_defaults_to_the_generated_answer() -> None:
    _engine, config = from_args([])
    assert config.request_plane == DEFAULT_REQUEST_PLANE == "tcp"


def test_environment_overrides_the_default_and_the_flag_overrides_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DYN_REQUEST_PLANE", OTHER_PLANE)
    assert from_args([])[1].request_plane == OTHER_PLANE
    flag = ["--request-plane", DEFAULT_REQUEST_PLANE]
    assert from_args(flag)[1].request_plane == DEFAULT_REQUEST_PLANE


@pytest.mark.parametrize("mode", [m.value for m in SUPPORTED_MODES])
def test_every_supported_role_is_accepted(mode: str) -> None:
    _engine, config = from_args(["--disaggregation-mode", mode])
    assert config.disaggregation_mode is DisaggregationMode(mode)


@pytest.mark.parametrize("mode", [m.value for m in DisaggregationMode if m not in SUPPORTED_MODES])
def test_an_unserved_role_is_a_typed_invalid_argument(mode: str) -> None:
    with pytest.raises(DynamoError) as info:
        from_args(["--disaggregation-mode", mode])
    assert info.value.is_invalid_argument
    assert mode in info.value.message


def test_malformed_flags_exit_with_status_2() -> None:
    with pytest.raises(SystemExit) as info:
        from_args(["--no-such-flag"])
    assert info.value.code == 2


def test_python_dash_m_help_lists_the_shared_and_the_engine_flags() -> None:
    src = Path(__file__).resolve().parent.parent / "src"
    out = subprocess.run(
        [sys.executable, "-m", "vllm_cpu_backend", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(src)},
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--model-path", "--discovery-backend", "--request-plane"):
        assert flag in out.stdout
