"""One configuration object: every setting is a ``WorkerConfig`` field, read once by ``args``.

* every environment variable in ``args.SETTINGS`` reaches its field, and a flag beats it;
* every ``WorkerConfig`` field (and sub-object field) is in the table, except the few that
  only engine code sets (listed here with the reason);
* a ``WorkerConfig`` built in code ignores the environment;
* each default is stated once, by the ``WorkerConfig`` field: a row carries none, a parser
  that refuses a value falls back to the field's, and a parser with no flag or variable given
  resolves to exactly ``WorkerConfig()``;
* the settings reference in the vendored docs is exactly what ``args`` generates.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backend_common.args import (
    SETTINGS,
    Setting,
    add_common_args,
    settings_markdown,
    worker_config_from_args,
)
from backend_common.config import WorkerConfig
from backend_common.errors import DynamoError

REPO = Path(__file__).resolve().parents[2]
RUNTIME = REPO / "template" / "src" / "backend_common"
SETTINGS_DOC = RUNTIME / "docs" / "settings.md"

# Fields with no flag and no variable: set by engine code (from_args / from_config) only.
CODE_ONLY = {
    "enable_local_indexer": "a model-card fact the engine knows",
    "metrics_labels": "extra Prometheus labels chosen by the engine",
}

# A value for each variable that differs from its default (text as an operator writes it).
SAMPLES: dict[str, tuple[str, Any]] = {
    "discovery_backend": ("file", "file"),
    "request_plane": ("nats", "nats"),
    "event_plane": ("zmq", "zmq"),
    "disaggregation_mode": ("prefill", "prefill"),
    "health_check_payload": ('{"token_ids": [1]}', {"token_ids": [1], "_HEALTH_CHECK": True}),
    "enable_kv_routing": ("1", False),
    "migration_limit": ("3", 3),
    "structural_tag": ('{"scope": "always"}', {"scope": "always"}),
    "tcp_port": ("4567", 4567),
    "system_port": ("9345", 9345),
    "etcd.lease_ttl": ("7", 7),
    "request_plane_codec": ("msgpack", "msgpack"),
    "max_message_size": ("1024", 1024),
    "engine_stream_timeout": ("1.5", 1.5),
    "debug_validate": ("1", True),
    "graceful_shutdown_grace_period": ("0.5", 0.5),
    "graceful_shutdown_timeout": ("2", 2.0),
    "graceful_shutdown_cleanup_timeout": ("3", 3.0),
    "health_check_enabled": ("1", True),
    "canary_wait_time": ("0.5", 0.5),
    "health_check_request_timeout": ("1", 1.0),
    "exclude_tools_when_tool_choice_none": ("false", False),
    "logging_jsonl": ("1", True),
    "log_filter": ("debug", "debug"),
    "tracing": ("1", True),
    "otel_exporter_protocol": ("grpc", "grpc"),
    "kube_discovery_mode": ("container", "container"),
}


def _get(config: WorkerConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _config(argv: list[str] | None = None) -> WorkerConfig:
    return worker_config_from_args(
        add_common_args(argparse.ArgumentParser()).parse_args(argv or [])
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for s in SETTINGS:
        if s.env:
            monkeypatch.delenv(s.env, raising=False)
    return monkeypatch


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.env], ids=lambda s: s.env)
def test_every_variable_reaches_its_field(setting, clean_env: pytest.MonkeyPatch) -> None:
    default = _get(_config(), setting.field)
    raw, expected = SAMPLES.get(setting.field, (f"value-of-{setting.env}", None))
    if expected is None:
        expected = raw
    clean_env.setenv(setting.env, raw)
    assert _get(_config(), setting.field) == expected != default


def test_a_flag_beats_its_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DYN_NAMESPACE", "from-env")
    clean_env.setenv("DYN_REQUEST_PLANE", "nats")
    config = _config(["--namespace", "from-flag", "--request-plane", "tcp"])
    assert (config.namespace, config.request_plane) == ("from-flag", "tcp")


def test_nats_server_does_not_pick_the_event_plane(clean_env: pytest.MonkeyPatch) -> None:
    # A real 1.6.1 worker with NATS_SERVER set and no --event-plane advertised its channels
    # on ZMQ; an unset plane means ZMQ (runtime.kv_events.routing).
    assert _config().event_plane is None
    clean_env.setenv("NATS_SERVER", "nats://127.0.0.1:4222")
    assert _config().event_plane is None
    assert _config(["--event-plane", "nats"]).event_plane == "nats"


def test_invalid_numbers_keep_their_defaults(clean_env: pytest.MonkeyPatch) -> None:
    for name in ("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", "DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT"):
        clean_env.setenv(name, "soon")
    clean_env.setenv("DYN_TCP_MAX_MESSAGE_SIZE", "-1")
    clean_env.setenv("DYN_ENGINE_STREAM_TIMEOUT_SECS", "0")
    clean_env.setenv("DYN_REQUEST_PLANE_CODEC", "xml")
    config = _config()
    assert config.graceful_shutdown_grace_period == 5.0
    assert config.graceful_shutdown_timeout == 30.0
    assert config.max_message_size == 32 * 1024 * 1024
    assert config.engine_stream_timeout is None
    assert config.request_plane_codec == "json"
    clean_env.setenv("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT", "-3")
    assert _config().graceful_shutdown_timeout == 0.0


def test_every_field_is_a_setting() -> None:
    fields = set()
    for f in dataclasses.fields(WorkerConfig):
        default = WorkerConfig().__getattribute__(f.name)
        if dataclasses.is_dataclass(default):
            fields |= {f"{f.name}.{sub.name}" for sub in dataclasses.fields(default)}
        else:
            fields.add(f.name)
    in_table = {s.field for s in SETTINGS}
    assert fields - in_table == set(CODE_ONLY)
    assert in_table <= fields


def test_a_config_built_in_code_ignores_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    baseline = WorkerConfig()
    for s in SETTINGS:
        if not s.env:
            continue
        raw, _ = SAMPLES.get(s.field, (f"value-of-{s.env}", None))
        clean_env.setenv(s.env, raw)
    assert _config() != baseline  # the environment does reach args ...
    assert WorkerConfig() == baseline  # ... and nothing else


def test_a_row_cannot_state_a_default() -> None:
    init = {f.name for f in dataclasses.fields(Setting) if f.init}
    assert "default" not in init, "defaults live in config.py, once"
    with pytest.raises(TypeError):
        Setting("namespace", "DYN_NAMESPACE", "help", default="other")  # type: ignore[call-arg]


def test_every_row_reads_its_default_from_the_field() -> None:
    fresh = WorkerConfig()
    for s in SETTINGS:
        assert s.default == _get(fresh, s.field), s.field


def test_nothing_given_is_exactly_the_dataclass_defaults(clean_env: pytest.MonkeyPatch) -> None:
    # The flags' defaults, the negated switch and the environment-only rows all resolve to
    # the fields' defaults: no second statement of a default anywhere on the way.
    assert _config() == WorkerConfig()


BAD_TEXT = "not-a-value?"


def _refuses(s: Setting) -> bool:
    try:
        s.parse(BAD_TEXT)  # type: ignore[misc]
    except ValueError:
        return True
    return False


# Rows whose variable is read by their parser (not by argparse as a flag's ``type``), that
# refuse some text and are not strict: a refused variable gives the field's default.
LENIENT = [
    s
    for s in SETTINGS
    if s.env
    and s.parse
    and not s.strict
    and (s.flag is None or isinstance(s.default, bool))
    and _refuses(s)
]


def test_the_lenient_rows_are_found() -> None:
    assert {"graceful_shutdown_timeout", "exclude_tools_when_tool_choice_none"} <= {
        s.field for s in LENIENT
    }


@pytest.mark.parametrize("setting", LENIENT, ids=lambda s: s.env)
def test_a_refused_value_falls_back_to_the_fields_default(
    setting, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv(setting.env, BAD_TEXT)
    with caplog.at_level("WARNING"):
        assert _get(_config(), setting.field) == _get(WorkerConfig(), setting.field)
    assert setting.env in caplog.text


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.strict], ids=lambda s: s.env)
def test_a_strict_setting_refuses_bad_text_with_a_typed_error(
    setting, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv(setting.env, "soon")
    with pytest.raises(DynamoError, match=setting.env) as info:
        _config()
    assert info.value.is_invalid_argument


def test_settings_doc_is_generated_from_the_table() -> None:
    text = SETTINGS_DOC.read_text(encoding="utf-8")
    assert text == settings_markdown(), (
        "stale; run: PYTHONPATH=template/src python -m backend_common.args --markdown "
        "> template/src/backend_common/docs/settings.md"
    )
    for s in SETTINGS:
        if s.env:
            assert f"`{s.env}`" in text
        if s.flag:
            assert f"`{s.flag}`" in text


def test_module_prints_the_reference() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "backend_common.args", "--markdown"],
        env={**os.environ, "PYTHONPATH": str(RUNTIME.parent)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout == settings_markdown()
