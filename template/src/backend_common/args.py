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

__all__ = [
    "SETTINGS",
    "Setting",
    "add_common_args",
    "log_filter_from_env",
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
        log.warning("health check payload: parse failed (%s); canary disabled", exc)
        return None
    if not isinstance(payload, dict):
        log.warning("health check payload: value must be a JSON object; canary disabled")
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


SETTINGS: tuple[Setting, ...] = (
    # Identity and model.
    Setting("namespace", "DYN_NAMESPACE", "dynamo", "Dynamo namespace", flag="--namespace"),
    Setting("component", "DYN_COMPONENT", "backend", "component name", flag="--component"),
    Setting("endpoint", "DYN_ENDPOINT", "generate", "endpoint name", flag="--endpoint"),
    Setting(
        "model_name",
        "DYN_MODEL_NAME",
        "",
        "served model name (public id); default: the model path's directory name",
        flag="--model-name",
    ),
    Setting(
        "model_path",
        "DYN_MODEL_PATH",
        None,
        "local directory with tokenizer.json, tokenizer_config.json, config.json",
        flag="--model-path",
    ),
    Setting(
        "served_model_name",
        "DYN_SERVED_MODEL_NAME",
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
        "KV event plane; unset: nats when NATS_SERVER is set, else none (only nats is supported)",
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
        "DYN_DISABLE_KV_ROUTING",
        False,
        "turn off KV event and snapshot publishing (the field is its negation)",
        flag="--disable-kv-routing",
        switch=True,
    ),
    Setting(
        "migration_limit",
        "DYN_MIGRATION_LIMIT",
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
        flag="--tool-call-parser",
        aliases=("--dyn-tool-call-parser",),
    ),
    Setting(
        "reasoning_parser",
        "DYN_REASONING_PARSER",
        None,
        "frontend reasoning parser name (model card)",
        flag="--reasoning-parser",
        aliases=("--dyn-reasoning-parser",),
    ),
    Setting(
        "structural_tag",
        "DYN_STRUCTURAL_TAG",
        None,
        'structural-tag settings for tool calling, a JSON object (e.g. \'{"scope": "always"}\'); '
        "published in the model card",
        flag="--structural-tag",
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
    Setting("system_host", "DYN_SYSTEM_HOST", "127.0.0.1", "status server bind address"),
    Setting(
        "system_port",
        "DYN_SYSTEM_PORT",
        None,
        "status server port (/health, /live, /metrics, model files); unset: no status server",
        parse=int,
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
    # Observability.
    Setting(
        "log_filter",
        "DYN_LOG",
        "info",
        "log filter: a level, or target=level pairs (backend_common=debug)",
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


# -- the parser -----------------------------------------------------------------------------
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "disaggregation_mode": DisaggregationMode.parse,
    "migration_limit": int,
    "structural_tag": _json_object,
}


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add Dynamo's shared worker flags; each defaults to its environment variable."""
    g = parser.add_argument_group("Dynamo worker")
    for s in SETTINGS:
        if s.flag is None:
            continue
        dest = s.flag.removeprefix("--").replace("-", "_")
        raw = _env(s.env) if s.env else None
        if s.switch:
            g.add_argument(
                s.flag, *s.aliases, dest=dest, action="store_true", default=_truthy(raw or "")
            )
            continue
        kwargs: dict[str, Any] = {"dest": dest, "help": s.help}
        kwargs["default"] = raw if raw is not None else s.default
        if s.choices:
            kwargs["choices"] = list(s.choices)
        if s.field in _FLAG_TYPES:
            kwargs["type"] = _FLAG_TYPES[s.field]
        g.add_argument(s.flag, *s.aliases, **kwargs)
    return parser


def worker_config_from_args(args: argparse.Namespace, **overrides: Any) -> WorkerConfig:
    """Build the ``WorkerConfig`` from parsed common args plus the environment-only settings."""
    model_path = args.model_path
    values: dict[str, Any] = dict(
        namespace=args.namespace,
        component=args.component,
        endpoint=args.endpoint,
        model_name=args.model_name or (Path(model_path).name if model_path else ""),
        model_path=model_path,
        served_model_name=args.served_model_name,
        endpoint_types=args.endpoint_types,
        discovery_backend=args.discovery_backend,
        request_plane=args.request_plane,
        event_plane=args.event_plane,
        disaggregation_mode=args.disaggregation_mode,
        custom_jinja_template=args.custom_jinja_template,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        structural_tag=_json_object(getattr(args, "structural_tag", None)),
        enable_kv_routing=not args.disable_kv_routing,
        migration_limit=args.migration_limit,
    )
    raw_payload = args.health_check_payload
    values["health_check_payload"] = parse_health_check_payload(raw_payload)
    values["health_check_disabled"] = bool(
        raw_payload and raw_payload.strip() and values["health_check_payload"] is None
    )
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
    if values["event_plane"] is None and _env("NATS_SERVER"):
        # Dynamo picks NATS when a NATS server is configured and no plane was named.
        values["event_plane"] = "nats"
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
        "Every setting of a worker, generated from `backend_common.args.SETTINGS` (regenerate",
        "with `python -m backend_common.args --markdown > docs/settings.md` from the runtime's",
        "parent directory). A flag beats its environment variable, which beats the default; an",
        "empty variable counts as unset. `args.py` reads them once, in `from_args`, into",
        "`WorkerConfig`; a `WorkerConfig` built in code gets the defaults and never reads the",
        "environment. Fields marked `etcd.` / `nats.` live in `WorkerConfig.etcd` / `.nats`.",
        "",
        "| Flag | Environment variable | Default | `WorkerConfig` field | Meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        flag = ", ".join(f"`{f}`" for f in (s.flag, *s.aliases) if f) or "—"
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
