"""The worker's settings: Dynamo's worker flags and environment variables, same names and defaults.

This is the one place the runtime reads the environment. A backend builds one ``argparse``
parser, calls ``add_common_args(parser)``, adds its own flags next to them, and turns the
parsed namespace into a ``WorkerConfig`` with ``worker_config_from_args(args)``, which also
reads the settings that have no flag. Precedence for every setting: flag > environment
variable > default. ``run`` additionally reads ``DYN_LOG`` through ``log_filter_from_env``
before ``from_args``, so that argument parsing itself logs with the operator's filter.

``SETTINGS`` lists every setting once (field, flag, variable, default, meaning); the parser,
the environment reads and the reference (``python -m backend_common.args --markdown``,
``settings_markdown()``) all come from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DisaggregationMode,
    EtcdOptions,
    NatsOptions,
    WorkerConfig,
)
from .errors import invalid_arg
from .flags import add_deprecated_alias, add_flag, adopt_engine_flag, setting_value, watch_parser

__all__ = [
    "SETTINGS",
    "Setting",
    "add_common_args",
    "log_filter_from_env",
    "logging_jsonl_from_env",
    "parse_health_check_payload",
    "settings_markdown",
    "worker_config_from_args",
]

log = logging.getLogger(__name__)


# -- value parsers (environment strings and flag values) ----------------------------------------
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


def _truthy(raw: str) -> bool:
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _otlp_protocol(raw: str) -> str:
    """``grpc`` or ``http/protobuf``; anything else warns and keeps ``http/protobuf``."""
    value = raw.strip().lower()
    if value in ("grpc", "http/protobuf"):
        return value
    log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%r is not grpc or http/protobuf; using http", raw)
    return "http/protobuf"


def _bool(name: str, default: bool) -> Callable[[str], bool]:
    """1/true/yes/on or 0/false/no/off; anything else warns and keeps ``default``."""

    def parse(raw: str) -> bool:
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        log.warning("%s=%r is not a boolean; using %s", name, raw, default)
        return default

    return parse


def _structural_tag(value: str | dict[str, Any] | bool | None) -> dict[str, Any] | bool | None:
    """``--dyn-structural-tag``: a JSON object, or true/false as in 1.6.1 (true: defaults)."""
    if isinstance(value, bool):
        return {} if value else False
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return {}
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    return _json_object(value)


def _system_port(raw: str) -> int | None:
    """``DYN_SYSTEM_PORT``: a port; negative (1.6.1's default, -1) means no status server."""
    try:
        port = int(raw)
    except ValueError:
        raise invalid_arg(f"DYN_SYSTEM_PORT={raw!r} is not an integer") from None
    if port > 65535:
        raise invalid_arg(f"DYN_SYSTEM_PORT={port} is not a port number")
    return port if port >= 0 else None


def _seconds(name: str, default: float) -> Callable[[str], float]:
    """Non-negative seconds: invalid or NaN warns and keeps ``default``; negative means 0."""

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            log.warning("%s=%r is not a number; using %s", name, raw, default)
            return default
        if math.isnan(value):
            return default
        return max(value, 0.0)

    return parse


def _optional_seconds(name: str) -> Callable[[str], float | None]:
    """Positive seconds; 0, negative or invalid turn the bound off (None)."""

    def parse(raw: str) -> float | None:
        try:
            value = float(raw)
        except ValueError:
            log.warning("%s=%r is not a number; the engine stream timeout is off", name, raw)
            return None
        return value if value > 0 and not math.isnan(value) else None

    return parse


def _max_message_size(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        return DEFAULT_MAX_MESSAGE_SIZE
    return value if value > 0 else DEFAULT_MAX_MESSAGE_SIZE


def _codec(raw: str) -> str:
    codec = raw.strip().lower() or "json"
    if codec not in ("json", "msgpack"):
        log.warning("DYN_REQUEST_PLANE_CODEC=%r is not json or msgpack; using json", codec)
        return "json"
    return codec


def _lease_ttl(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise invalid_arg(f"ETCD_LEASE_TTL must be an integer, got {raw!r}") from None


# -- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One setting: where it lands in ``WorkerConfig`` and where it comes from.

    ``field`` is the ``WorkerConfig`` attribute (``etcd.lease_ttl`` for a sub-object). With a
    ``flag`` the environment variable is the flag's default; without one it is read by
    ``worker_config_from_args``. An empty environment value counts as unset. ``parse`` turns
    the variable's text into the field's value.
    """

    field: str
    env: str | None
    default: Any
    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    switch: bool = False  # a flag without a value: present = on; the variable is a boolean
    # Old spellings of the flag, accepted (hidden, with a warning) for one release.
    deprecated: tuple[str, ...] = ()
    # The variable applies after the engine's flags (flags.py): an engine flag given on the
    # command line feeding this setting beats the variable, as a flag beats its variable.
    env_after_engine: bool = False


SETTINGS: tuple[Setting, ...] = (
    # Identity and model.
    Setting("namespace", "DYN_NAMESPACE", "dynamo", "Dynamo namespace", flag="--namespace"),
    Setting("component", "DYN_COMPONENT", "backend", "component name", flag="--component"),
    Setting("endpoint", "DYN_ENDPOINT", "generate", "endpoint name", flag="--endpoint"),
    # No variables for the model's names and path: DYN_MODEL_NAME / DYN_MODEL_PATH are the
    # 1.6.1 frontend's, and a shared environment must not leak them into workers.
    Setting(
        "model_name",
        None,
        "",
        "served model name (public id); default: the model path's directory name",
        flag="--model-name",
    ),
    Setting(
        "model_path",
        None,
        None,
        "local directory with tokenizer.json, tokenizer_config.json, config.json",
        flag="--model-path",
    ),
    Setting(
        "served_model_name",
        None,
        None,
        "public model name, overriding --model-name",
        flag="--served-model-name",
    ),
    Setting(
        "endpoint_types",
        "DYN_ENDPOINT_TYPES",
        "chat,completions",
        "endpoint types the model card advertises",
        flag="--endpoint-types",
    ),
    # Planes.
    Setting(
        "discovery_backend",
        "DYN_DISCOVERY_BACKEND",
        "etcd",
        "where the worker registers",
        flag="--discovery-backend",
        choices=("etcd", "file"),
    ),
    Setting(
        "request_plane",
        "DYN_REQUEST_PLANE",
        "tcp",
        "how requests reach the worker",
        flag="--request-plane",
        choices=("tcp", "nats"),
    ),
    Setting(
        "event_plane",
        "DYN_EVENT_PLANE",
        None,
        "KV event plane; unset: zmq, as in Dynamo 1.6.1 (also when NATS_SERVER is set)",
        flag="--event-plane",
        choices=("nats", "zmq"),
    ),
    Setting(
        "disaggregation_mode",
        "DYN_DISAGGREGATION_MODE",
        "agg",
        "agg | prefill | decode",
        flag="--disaggregation-mode",
    ),
    Setting(
        "health_check_payload",
        "DYN_HEALTH_CHECK_PAYLOAD",
        None,
        "JSON object or @file used as the health canary request",
        flag="--health-check-payload",
    ),
    Setting(
        "enable_kv_routing",
        None,
        False,
        "turn off KV event and snapshot publishing (the field is its negation)",
        flag="--disable-kv-routing",
        switch=True,
    ),
    Setting(
        "migration_limit",
        None,  # DYN_MIGRATION_LIMIT is the 1.6.1 frontend's
        0,
        "frontend retries of a stream whose worker is lost (model card)",
        flag="--migration-limit",
        parse=int,
    ),
    Setting(
        "custom_jinja_template",
        "DYN_CUSTOM_JINJA_TEMPLATE",
        None,
        "chat template file that replaces the model's",
        flag="--custom-jinja-template",
    ),
    Setting(
        "tool_call_parser",
        "DYN_TOOL_CALL_PARSER",
        None,
        "frontend tool-call parser name (model card)",
        flag="--dyn-tool-call-parser",
        deprecated=("--tool-call-parser",),
        env_after_engine=True,
    ),
    Setting(
        "reasoning_parser",
        "DYN_REASONING_PARSER",
        None,
        "frontend reasoning parser name (model card)",
        flag="--dyn-reasoning-parser",
        deprecated=("--reasoning-parser",),
        env_after_engine=True,
    ),
    Setting(
        "exclude_tools_when_tool_choice_none",
        "DYN_EXCLUDE_TOOLS_WHEN_TOOL_CHOICE_NONE",
        True,
        "leave tool definitions out of the chat template when tool_choice is 'none' "
        "(model card); --no-exclude-tools-when-tool-choice-none turns it off",
        flag="--exclude-tools-when-tool-choice-none",
        parse=_bool("DYN_EXCLUDE_TOOLS_WHEN_TOOL_CHOICE_NONE", True),
    ),
    Setting(
        "structural_tag",
        "DYN_STRUCTURAL_TAG",
        None,
        'structural-tag settings for tool calling: a JSON object (e.g. \'{"scope": "always"}\'), '
        "true (the defaults) or false; published in the model card",
        flag="--dyn-structural-tag",
        deprecated=("--structural-tag",),
    ),
    # Connections (environment only).
    Setting("etcd_endpoints", "ETCD_ENDPOINTS", "http://localhost:2379", "etcd URLs, comma list"),
    Setting("nats_server", "NATS_SERVER", "nats://localhost:4222", "NATS URLs, comma list"),
    Setting(
        "file_kv",
        "DYN_FILE_KV",
        None,
        "file discovery root; unset: $TMPDIR/dynamo_store_kv",
    ),
    Setting("tcp_host", "DYN_TCP_RPC_HOST", "127.0.0.1", "TCP request plane bind address"),
    Setting("tcp_port", "DYN_TCP_RPC_PORT", 0, "TCP request plane port (0: any)", parse=int),
    Setting(
        "event_plane_host",
        "DYN_EVENT_PLANE_HOST",
        "127.0.0.1",
        "ZMQ event plane: the address its sockets bind and advertise",
    ),
    Setting("system_host", "DYN_SYSTEM_HOST", "127.0.0.1", "status server bind address"),
    Setting(
        "system_port",
        "DYN_SYSTEM_PORT",
        None,
        "status server port (/health, /live, /metrics, model files); unset or -1: no status server",
        parse=_system_port,
    ),
    Setting("etcd.lease_ttl", "ETCD_LEASE_TTL", 10, "etcd lease TTL in seconds", parse=_lease_ttl),
    Setting("etcd.username", "ETCD_AUTH_USERNAME", None, "etcd user"),
    Setting("etcd.password", "ETCD_AUTH_PASSWORD", None, "etcd password"),
    Setting("etcd.tls_ca", "ETCD_AUTH_CA", None, "etcd CA (PEM file or text); turns TLS on"),
    Setting("etcd.tls_client_cert", "ETCD_AUTH_CLIENT_CERT", None, "etcd client certificate"),
    Setting("etcd.tls_client_key", "ETCD_AUTH_CLIENT_KEY", None, "etcd client key"),
    Setting("nats.auth_token", "NATS_AUTH_TOKEN", None, "NATS token (instead of one in the URL)"),
    Setting("nats.tls_ca", "NATS_TLS_CA", None, "NATS CA bundle file; turns TLS on"),
    Setting("nats.tls_cert", "NATS_TLS_CERT", None, "NATS client certificate file"),
    Setting("nats.tls_key", "NATS_TLS_KEY", None, "NATS client key file"),
    # Serving.
    Setting(
        "request_plane_codec",
        "DYN_REQUEST_PLANE_CODEC",
        "json",
        "payload codec advertised in the Endpoint record: json or msgpack",
        parse=_codec,
    ),
    Setting(
        "max_message_size",
        "DYN_TCP_MAX_MESSAGE_SIZE",
        DEFAULT_MAX_MESSAGE_SIZE,
        "longest request body in bytes (invalid or <= 0: the default)",
        parse=_max_message_size,
    ),
    Setting(
        "engine_stream_timeout",
        "DYN_ENGINE_STREAM_TIMEOUT_SECS",
        None,
        "longest wait for the engine's next item, first included; unset or 0: no bound",
        parse=_optional_seconds("DYN_ENGINE_STREAM_TIMEOUT_SECS"),
    ),
    Setting(
        "debug_validate",
        "DYN_DEBUG_VALIDATE",
        False,
        "check every engine stream against the stream rules (costs one read per stream)",
        parse=_truthy,
    ),
    # Shutdown.
    Setting(
        "graceful_shutdown_grace_period",
        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",
        5.0,
        "seconds between leaving discovery and draining (at least 0.1)",
        parse=_seconds("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", 5.0),
    ),
    Setting(
        "graceful_shutdown_timeout",
        "DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT",
        30.0,
        "seconds in-flight streams get after the drain starts; then they are cancelled",
        parse=_seconds("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT", 30.0),
    ),
    Setting(
        "graceful_shutdown_cleanup_timeout",
        "DYN_WORKER_SHUTDOWN_CLEANUP_TIMEOUT_SECS",
        None,
        "seconds engine.cleanup() may take; unset: the drain timeout. Past grace + drain + "
        "cleanup (+ 7 s of fixed steps) the process exits with code 124",
        parse=_seconds("DYN_WORKER_SHUTDOWN_CLEANUP_TIMEOUT_SECS", 30.0),
    ),
    # Health canary.
    Setting(
        "health_check_enabled",
        "DYN_HEALTH_CHECK_ENABLED",
        False,
        "run the health canary by itself whenever the worker has been idle for "
        "DYN_CANARY_WAIT_TIME",
        parse=_truthy,
    ),
    Setting(
        "canary_wait_time",
        "DYN_CANARY_WAIT_TIME",
        10.0,
        "seconds without a request before the canary runs",
        parse=_seconds("DYN_CANARY_WAIT_TIME", 10.0),
    ),
    Setting(
        "health_check_request_timeout",
        "DYN_HEALTH_CHECK_REQUEST_TIMEOUT",
        3.0,
        "seconds one canary may take",
        parse=_seconds("DYN_HEALTH_CHECK_REQUEST_TIMEOUT", 3.0),
    ),
    # Observability.
    Setting(
        "log_filter",
        "DYN_LOG",
        "info",
        "log filter: a level, or target=level pairs (backend_common=debug)",
    ),
    Setting(
        "logging_jsonl",
        "DYN_LOGGING_JSONL",
        False,
        "log JSON lines as Dynamo's workers write them",
        parse=_truthy,
    ),
    Setting(
        "prometheus_multiproc_dir",
        "PROMETHEUS_MULTIPROC_DIR",
        None,
        "an engine's multiprocess Prometheus directory, served on /metrics",
    ),
    Setting(
        "tracing",
        "OTEL_EXPORT_ENABLED",
        False,
        "OpenTelemetry span per request (engine.generate), exported over OTLP",
        parse=_truthy,
    ),
    Setting(
        "otel_service_name",
        "OTEL_SERVICE_NAME",
        "backend_common",
        "service.name of the exported spans",
    ),
    Setting(
        "otel_exporter_protocol",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "http/protobuf",
        "OTLP protocol of the span export: http/protobuf (the tracing extra's exporter) or "
        "grpc (needs opentelemetry-exporter-otlp-proto-grpc); OTEL_EXPORTER_OTLP_ENDPOINT "
        "and the other OTEL_EXPORTER_OTLP_* variables are read by the exporter itself",
        parse=_otlp_protocol,
    ),
)

_BY_FIELD = {s.field: s for s in SETTINGS}


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value == "" else value


def _from_env(setting: Setting) -> Any:
    raw = _env(setting.env) if setting.env else None
    if raw is None:
        return setting.default
    return setting.parse(raw) if setting.parse is not None else raw


def log_filter_from_env() -> str:
    """``DYN_LOG`` (default ``info``): what ``run`` configures logging with before ``from_args``."""
    return _from_env(_BY_FIELD["log_filter"])


def logging_jsonl_from_env() -> bool:
    """``DYN_LOGGING_JSONL``: whether ``run`` configures JSON-line logging."""
    return _from_env(_BY_FIELD["logging_jsonl"])


# -- the parser -----------------------------------------------------------------------------
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "disaggregation_mode": DisaggregationMode.parse,
    "migration_limit": int,
    "structural_tag": _structural_tag,
}


def _dest(s: Setting) -> str:
    assert s.flag is not None
    return s.flag.removeprefix("--").replace("-", "_")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add Dynamo's shared worker flags (1.6.1 names); each defaults to its variable.

    Never adds an option string the parser already has, and yields any it has to a flag the
    engine adds later (``flags.py``): the engine's definition wins and the setting is read
    from it. ``deprecated`` spellings are hidden aliases that warn when used.
    """
    g = parser.add_argument_group("Dynamo worker")
    for s in SETTINGS:
        if s.flag is None:
            continue
        dest = _dest(s)
        raw = _env(s.env) if s.env and not s.env_after_engine else None
        if s.switch:
            add_flag(
                parser,
                g,
                s.flag,
                *s.aliases,
                setting=s.field,
                dest=dest,
                action="store_true",
                default=_truthy(raw or ""),
                help=s.help,
            )
            continue
        kwargs: dict[str, Any] = {"dest": dest, "help": s.help}
        if isinstance(s.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = s.parse(raw) if raw is not None and s.parse else s.default
        else:
            kwargs["default"] = raw if raw is not None else s.default
        if s.choices:
            kwargs["choices"] = list(s.choices)
        if s.field in _FLAG_TYPES:
            kwargs["type"] = _FLAG_TYPES[s.field]
        if s.field == "structural_tag":
            kwargs.update(nargs="?", const="true")
        add_flag(parser, g, s.flag, *s.aliases, setting=s.field, **kwargs)
        for old in s.deprecated:
            typed = {"type": kwargs["type"]} if "type" in kwargs else {}
            add_deprecated_alias(parser, g, old, new=s.flag, setting=s.field, dest=dest, **typed)
    # An engine's --model (vLLM) names the model directory too.
    adopt_engine_flag(parser, "--model", setting="model_path")
    watch_parser(parser)
    return parser


def worker_config_from_args(args: argparse.Namespace, **overrides: Any) -> WorkerConfig:
    """Build the ``WorkerConfig`` from parsed common args plus the environment-only settings.

    A setting whose flag the engine defines is read from the engine's flag (``flags.py``).
    """
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.flag is None:
            continue
        value = setting_value(args, s.field, _dest(s))
        if value is None and s.env_after_engine:
            value = _from_env(s)
        values[s.field] = s.default if value is None else value
    model_path = values["model_path"]
    values["model_name"] = values["model_name"] or (Path(model_path).name if model_path else "")
    values["enable_kv_routing"] = not values["enable_kv_routing"]  # the flag is its negation
    values["migration_limit"] = int(values["migration_limit"])
    structural_tag = _structural_tag(values["structural_tag"])
    values["structural_tag"] = structural_tag if isinstance(structural_tag, dict) else None
    values["exclude_tools_when_tool_choice_none"] = bool(
        values["exclude_tools_when_tool_choice_none"]
    )
    values["health_check_payload"] = parse_health_check_payload(values["health_check_payload"])
    sub: dict[str, dict[str, Any]] = {"etcd": {}, "nats": {}}
    for s in SETTINGS:
        if s.flag is not None:
            continue
        head, _, rest = s.field.partition(".")
        if rest:
            sub[head][rest] = _from_env(s)
        else:
            values[s.field] = _from_env(s)
    values["etcd"] = EtcdOptions(**sub["etcd"])
    values["nats"] = NatsOptions(**sub["nats"])
    values.update(overrides)
    return WorkerConfig(**values)


# -- the reference ----------------------------------------------------------------------------
def _shown_default(s: Setting) -> str:
    if s.default is None:
        return "unset"
    if s.default == "":
        return "empty"
    if s.switch or isinstance(s.default, bool):
        return "off" if not s.default else "on"
    return f"`{s.default}`"


def settings_markdown() -> str:
    """``docs/settings.md``: every setting's flag, variable, default, field and meaning."""
    lines = [
        "# Worker settings",
        "",
        "Every setting of a worker, generated from `backend_common.args.SETTINGS`: this file is",
        "the output of `python -m backend_common.args --markdown`. A flag beats its environment",
        "variable, which beats the default; an empty variable counts as unset. The Dynamo 1.6.x",
        "names and defaults are kept. `args.py` reads them once, in `from_args`, into",
        "`WorkerConfig`; a `WorkerConfig` built in code gets the defaults and never reads the",
        "environment. Fields marked `etcd.` / `nats.` live in `WorkerConfig.etcd` / `.nats`.",
        "",
        "| Flag | Environment variable | Default | `WorkerConfig` field | Meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        flag = ", ".join(f"`{f}`" for f in (s.flag, *s.aliases) if f) or "—"
        if s.deprecated:
            flag += " (old: " + ", ".join(f"`{f}`" for f in s.deprecated) + ")"
        env = f"`{s.env}`" if s.env else "—"
        meaning = s.help.replace("|", "\\|")
        lines.append(f"| {flag} | {env} | {_shown_default(s)} | `{s.field}` | {meaning} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backend_common.args", description="the worker's settings"
    )
    parser.add_argument("--markdown", action="store_true", help="print the reference table")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(settings_markdown())
    else:
        add_common_args(argparse.ArgumentParser(prog="worker")).print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
