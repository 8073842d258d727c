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

__all__ = ["add_common_args", "parse_health_check_payload", "worker_config_from_args"]

log = logging.getLogger(__name__)


def _env(name: str, default: Any = None) -> Any:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_bool(name: str) -> bool:
    return str(_env(name, "")).strip().lower() in ("1", "true", "yes", "on")


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


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("Dynamo worker")
    g.add_argument("--namespace", default=_env("DYN_NAMESPACE", "dynamo"))
    g.add_argument("--component", default=_env("DYN_COMPONENT", "backend"))
    g.add_argument("--endpoint", default=_env("DYN_ENDPOINT", "generate"))
    g.add_argument(
        "--model-name", default=_env("DYN_MODEL_NAME", ""), help="served model name (public id)"
    )
    g.add_argument(
        "--model-path",
        default=_env("DYN_MODEL_PATH"),
        help="local directory with tokenizer.json, tokenizer_config.json, config.json",
    )
    g.add_argument("--served-model-name", default=_env("DYN_SERVED_MODEL_NAME"))
    g.add_argument("--endpoint-types", default=_env("DYN_ENDPOINT_TYPES", "chat,completions"))
    g.add_argument(
        "--discovery-backend",
        choices=["etcd", "file"],
        default=_env("DYN_DISCOVERY_BACKEND", "etcd"),
    )
    g.add_argument(
        "--request-plane", choices=["tcp", "nats"], default=_env("DYN_REQUEST_PLANE", "tcp")
    )
    g.add_argument("--event-plane", choices=["nats", "zmq"], default=_env("DYN_EVENT_PLANE"))
    g.add_argument(
        "--disaggregation-mode",
        type=DisaggregationMode.parse,
        default=_env("DYN_DISAGGREGATION_MODE", "agg"),
        help="agg | prefill | decode",
    )
    g.add_argument(
        "--health-check-payload",
        default=_env("DYN_HEALTH_CHECK_PAYLOAD"),
        help="JSON object or @file used as the health canary request",
    )
    g.add_argument(
        "--disable-kv-routing",
        action="store_true",
        default=_env_bool("DYN_DISABLE_KV_ROUTING"),
    )
    g.add_argument("--migration-limit", type=int, default=int(_env("DYN_MIGRATION_LIMIT", 0)))
    g.add_argument("--custom-jinja-template", default=_env("DYN_CUSTOM_JINJA_TEMPLATE"))
    g.add_argument(
        "--tool-call-parser",
        "--dyn-tool-call-parser",
        dest="tool_call_parser",
        default=_env("DYN_TOOL_CALL_PARSER"),
    )
    g.add_argument(
        "--reasoning-parser",
        "--dyn-reasoning-parser",
        dest="reasoning_parser",
        default=_env("DYN_REASONING_PARSER"),
    )
    g.add_argument(
        "--structural-tag",
        type=_json_object,
        default=_env("DYN_STRUCTURAL_TAG"),
        help="structural-tag settings for tool calling, a JSON object "
        '(e.g. \'{"scope": "always"}\'); published in the model card',
    )
    return parser


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
    """Build the ``WorkerConfig`` from parsed common args plus the connection env vars."""
    system_port = _env("DYN_SYSTEM_PORT")
    model_path = args.model_path
    model_name = args.model_name or (Path(model_path).name if model_path else "")
    values: dict[str, Any] = dict(
        namespace=args.namespace,
        component=args.component,
        endpoint=args.endpoint,
        model_name=model_name,
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
        health_check_payload=parse_health_check_payload(args.health_check_payload),
        etcd_endpoints=_env("ETCD_ENDPOINTS", "http://localhost:2379"),
        nats_server=_env("NATS_SERVER", "nats://localhost:4222"),
        file_kv=_env("DYN_FILE_KV"),
        tcp_host=_env("DYN_TCP_RPC_HOST", "127.0.0.1"),
        tcp_port=int(_env("DYN_TCP_RPC_PORT", 0)),
        system_host=_env("DYN_SYSTEM_HOST", "127.0.0.1"),
        system_port=int(system_port) if system_port is not None else None,
    )
    values.update(overrides)
    return WorkerConfig(**values)
