"""The CLI every backend shares: Dynamo's worker flags and env vars, same names and defaults.

A backend builds one ``argparse`` parser, calls ``add_common_args(parser)``,
adds its own flags next to them, and turns the parsed namespace into a
``WorkerConfig`` with ``worker_config_from_args(args)``. Precedence for every
setting: flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from .config import DisaggregationMode, WorkerConfig
from .errors import invalid_arg
from .flags import add_deprecated_alias, add_flag, adopt_engine_flag, setting_value, watch_parser

__all__ = ["add_common_args", "parse_health_check_payload", "worker_config_from_args"]

log = logging.getLogger(__name__)


def _env(name: str, default: Any = None) -> Any:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_bool(name: str, default: bool = False) -> bool:
    value = str(_env(name, "")).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return default


def parse_health_check_payload(value: str | None) -> dict[str, Any] | None:
    """JSON object or ``@file``. Invalid or non-object values warn and return ``None``."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        if text.startswith("@"):
            text = Path(text[1:]).read_text(encoding="utf-8")
        payload = json.loads(text)
    except (OSError, ValueError) as exc:
        log.warning("health check payload: parse failed (%s); ignored", exc)
        return None
    if not isinstance(payload, dict):
        log.warning("health check payload: value must be a JSON object; ignored")
        return None
    payload["_HEALTH_CHECK"] = True
    return payload


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add Dynamo's worker flags (1.6.1 names) to ``parser``; return it.

    Never adds an option string the parser already has, and yields any it has to a flag
    the engine adds later (``flags.py``): the engine's definition wins and the setting is
    read from it. Old spellings (``--tool-call-parser``, ``--reasoning-parser``,
    ``--structural-tag``) are hidden aliases for one release.
    """
    g = parser.add_argument_group("Dynamo worker")

    def flag(*names: str, setting: str | None = None, **kwargs: Any) -> None:
        dest = kwargs.setdefault("dest", names[0].lstrip("-").replace("-", "_"))
        add_flag(parser, g, *names, setting=setting or dest, **kwargs)

    flag("--namespace", default=_env("DYN_NAMESPACE", "dynamo"))
    flag("--component", default=_env("DYN_COMPONENT", "backend"))
    flag("--endpoint", default=_env("DYN_ENDPOINT", "generate"))
    flag("--model-name", default="", help="model name; the default public id (no env variable)")
    flag(
        "--model-path",
        default=None,
        help="local directory with tokenizer.json, tokenizer_config.json, config.json",
    )
    # An engine's --model (vLLM) names the model directory too.
    adopt_engine_flag(parser, "--model", setting="model_path")
    flag("--served-model-name", default=None, help="public model name (default: --model-name)")
    flag("--endpoint-types", default=_env("DYN_ENDPOINT_TYPES", "chat,completions"))
    flag(
        "--discovery-backend",
        choices=["etcd", "file"],
        default=_env("DYN_DISCOVERY_BACKEND", "etcd"),
    )
    flag("--request-plane", choices=["tcp", "nats"], default=_env("DYN_REQUEST_PLANE", "tcp"))
    flag("--event-plane", choices=["nats", "zmq"], default=_env("DYN_EVENT_PLANE"))
    flag(
        "--disaggregation-mode",
        type=DisaggregationMode.parse,
        default=_env("DYN_DISAGGREGATION_MODE", "agg"),
        help="agg | prefill | decode",
    )
    flag(
        "--health-check-payload",
        default=_env("DYN_HEALTH_CHECK_PAYLOAD"),
        help="JSON object or @file used as the health canary request",
    )
    flag("--disable-kv-routing", action="store_true", default=False)
    flag("--migration-limit", type=int, default=0)
    flag("--custom-jinja-template", default=_env("DYN_CUSTOM_JINJA_TEMPLATE"))
    # The parsers' defaults come from the environment in worker_config_from_args, so that an
    # engine's own --tool-call-parser given on the command line beats DYN_TOOL_CALL_PARSER.
    flag(
        "--dyn-tool-call-parser",
        setting="tool_call_parser",
        default=None,
        help="tool call parser name for the model (env DYN_TOOL_CALL_PARSER)",
    )
    add_deprecated_alias(
        parser,
        g,
        "--tool-call-parser",
        new="--dyn-tool-call-parser",
        setting="tool_call_parser",
        dest="dyn_tool_call_parser",
    )
    flag(
        "--dyn-reasoning-parser",
        setting="reasoning_parser",
        default=None,
        help="reasoning parser name for the model (env DYN_REASONING_PARSER)",
    )
    add_deprecated_alias(
        parser,
        g,
        "--reasoning-parser",
        new="--dyn-reasoning-parser",
        setting="reasoning_parser",
        dest="dyn_reasoning_parser",
    )
    flag(
        "--exclude-tools-when-tool-choice-none",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("DYN_EXCLUDE_TOOLS_WHEN_TOOL_CHOICE_NONE", True),
        help="leave tool definitions out of the chat template when tool_choice is 'none'",
    )
    flag(
        "--dyn-structural-tag",
        setting="structural_tag",
        type=_structural_tag,
        nargs="?",
        const="true",
        default=_env("DYN_STRUCTURAL_TAG"),
        help="structural-tag settings for tool calling: a JSON object "
        '(e.g. \'{"scope": "always"}\'), true (defaults) or false; published in the model card',
    )
    add_deprecated_alias(
        parser,
        g,
        "--structural-tag",
        new="--dyn-structural-tag",
        setting="structural_tag",
        dest="dyn_structural_tag",
        type=_structural_tag,
    )
    watch_parser(parser)
    return parser


def _structural_tag(value: str | dict[str, Any] | bool | None) -> dict[str, Any] | bool | None:
    """``--dyn-structural-tag``: a JSON object, or true/false as in 1.6.1 (true: defaults)."""
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return {}
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    if isinstance(value, bool):
        return {} if value else False
    return _json_object(value)


def _json_object(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return parsed


def worker_config_from_args(args: argparse.Namespace, **overrides: Any) -> WorkerConfig:
    """Build the ``WorkerConfig`` from parsed common args plus the connection env vars.

    A setting whose flag the engine defines is read from the engine's flag (``flags.py``).
    """

    def value(setting: str, dest: str | None = None, default: Any = None) -> Any:
        found = setting_value(args, setting, dest)
        return default if found is None else found

    system_port = _env("DYN_SYSTEM_PORT")
    model_path = value("model_path")
    model_name = value("model_name") or (Path(model_path).name if model_path else "")
    structural_tag = _structural_tag(value("structural_tag", "dyn_structural_tag"))
    values: dict[str, Any] = dict(
        namespace=value("namespace"),
        component=value("component"),
        endpoint=value("endpoint"),
        model_name=model_name,
        model_path=model_path,
        served_model_name=value("served_model_name"),
        endpoint_types=value("endpoint_types"),
        discovery_backend=value("discovery_backend"),
        request_plane=value("request_plane"),
        event_plane=value("event_plane"),
        disaggregation_mode=value("disaggregation_mode"),
        custom_jinja_template=value("custom_jinja_template"),
        tool_call_parser=value(
            "tool_call_parser", "dyn_tool_call_parser", _env("DYN_TOOL_CALL_PARSER")
        ),
        reasoning_parser=value(
            "reasoning_parser", "dyn_reasoning_parser", _env("DYN_REASONING_PARSER")
        ),
        exclude_tools_when_tool_choice_none=bool(
            value("exclude_tools_when_tool_choice_none", default=True)
        ),
        structural_tag=structural_tag if isinstance(structural_tag, dict) else None,
        enable_kv_routing=not value("disable_kv_routing", default=False),
        migration_limit=int(value("migration_limit", default=0)),
        health_check_payload=parse_health_check_payload(value("health_check_payload")),
        etcd_endpoints=_env("ETCD_ENDPOINTS", "http://localhost:2379"),
        nats_server=_env("NATS_SERVER", "nats://localhost:4222"),
        file_kv=_env("DYN_FILE_KV"),
        tcp_host=_env("DYN_TCP_RPC_HOST", "127.0.0.1"),
        tcp_port=int(_env("DYN_TCP_RPC_PORT", 0)),
        system_host=_env("DYN_SYSTEM_HOST", "127.0.0.1"),
        system_port=_system_port(system_port),
        shutdown_grace_period_s=_env_seconds("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", 5.0),
        shutdown_timeout_s=_env_seconds("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT", 30.0),
        shutdown_cleanup_timeout_s=_env_seconds("DYN_WORKER_SHUTDOWN_CLEANUP_TIMEOUT_SECS", None),
        health_check_enabled=_env_bool("DYN_HEALTH_CHECK_ENABLED", False),
        canary_wait_s=_env_seconds("DYN_CANARY_WAIT_TIME", 10.0),
        health_check_timeout_s=_env_seconds("DYN_HEALTH_CHECK_REQUEST_TIMEOUT", 3.0),
        prometheus_multiproc_dir=_env("PROMETHEUS_MULTIPROC_DIR"),
    )
    values.update(overrides)
    return WorkerConfig(**values)


def _system_port(raw: str | None) -> int | None:
    """``DYN_SYSTEM_PORT``: unset or negative (1.6.1's default -1) means no status server."""
    if raw is None:
        return None
    try:
        port = int(raw)
    except ValueError:
        raise invalid_arg(f"DYN_SYSTEM_PORT={raw!r} is not an integer") from None
    if port > 65535:
        raise invalid_arg(f"DYN_SYSTEM_PORT={port} is not a port number")
    return port if port >= 0 else None


def _env_seconds(name: str, default: float | None) -> float | None:
    """A duration from the environment: unset or empty -> ``default``; negative -> 0;
    not a finite number -> a warning and ``default`` (as Dynamo's workers read them)."""
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number; using %s", name, raw, default)
        return default
    if value != value or value in (float("inf"), float("-inf")):
        log.warning("%s=%r is not a finite number; using %s", name, raw, default)
        return default
    return max(value, 0.0)
