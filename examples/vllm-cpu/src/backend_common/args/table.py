"""``SETTINGS``: every setting of the worker, one row each, and what a row says.

A row names the ``WorkerConfig`` field (``etcd.lease_ttl`` for a sub-object's), the
environment variable, the meaning and, for a setting with a command-line flag, the flag.
The default is not in the row: it is the field's own default in ``config.py``, stated once
(``Setting.default`` reads it; ``tests/runtime/test_settings.py`` keeps it so).

Adding a setting: a field with its default in ``WorkerConfig`` (or ``EtcdOptions`` /
``NatsOptions``), a row here, a parser from ``values.py`` when the value is not a string,
then regenerate ``docs/settings.md`` (``python -m backend_common.args --markdown``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import DisaggregationMode, WorkerConfig
from . import values

__all__ = ["SETTINGS", "Setting", "by_field", "sub_object_type"]


def sub_object_type(name: str) -> type:
    """The dataclass of ``WorkerConfig`` field ``name`` that holds a group (``etcd``)."""
    factory = {f.name: f for f in dataclasses.fields(WorkerConfig)}[name].default_factory
    if not (isinstance(factory, type) and dataclasses.is_dataclass(factory)):
        raise TypeError(f"WorkerConfig.{name} is not a group of settings")
    return factory


@functools.cache
def _field_default(path: str) -> Any:
    """The dataclass default of ``WorkerConfig`` field ``path`` (``etcd.lease_ttl``: nested)."""
    head, _, rest = path.rpartition(".")
    owner = sub_object_type(head) if head else WorkerConfig
    name = rest
    spec = {f.name: f for f in dataclasses.fields(owner)}[name]
    if spec.default is dataclasses.MISSING:
        raise TypeError(f"WorkerConfig.{path} has no plain default; a setting needs one")
    return spec.default


@dataclass(frozen=True)
class Setting:
    """One setting: where it lands in ``WorkerConfig`` and where it comes from.

    With a ``flag`` the environment variable is the flag's default; without one it is read
    by ``worker_config_from_args``. An empty environment value counts as unset.
    """

    field: str
    env: str | None
    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    # Text to value: the variable's reader and the flag's argparse ``type`` (values.py).
    # It raises ValueError for text it refuses.
    parse: Callable[[str], Any] | None = None
    # A refused variable is a typed InvalidArgument (True) or a warning and the default.
    strict: bool = False
    # The resolved value (any source, the default included) to the field's value.
    to_field: Callable[[Any], Any] | None = None
    switch: bool = False  # a flag without a value: present = on; the variable is a boolean
    negated: bool = False  # a switch whose field is its negation (--disable-...)
    bare: str | None = None  # the value of the flag given without one (nargs="?")
    # Old spellings of the flag, accepted (hidden, with a warning) for one release.
    deprecated: tuple[str, ...] = ()
    # The variable applies after the engine's flags (flags.py): an engine flag given on the
    # command line feeding this setting beats the variable, as a flag beats its variable.
    env_after_engine: bool = False

    @property
    def default(self) -> Any:
        """The field's default (``WorkerConfig``'s dataclass field): the one statement of it."""
        return _field_default(self.field)

    @property
    def flag_default(self) -> Any:
        """The flag's value when neither it nor its variable is given."""
        return not self.default if self.negated else self.default

    @property
    def dest(self) -> str:
        """The namespace attribute of the flag."""
        assert self.flag is not None
        return self.flag.removeprefix("--").replace("-", "_")


SETTINGS: tuple[Setting, ...] = (
    # Identity and model.
    Setting("namespace", "DYN_NAMESPACE", "Dynamo namespace", flag="--namespace"),
    Setting("component", "DYN_COMPONENT", "component name", flag="--component"),
    Setting("endpoint", "DYN_ENDPOINT", "endpoint name", flag="--endpoint"),
    # No variables for the model's names and path: DYN_MODEL_NAME / DYN_MODEL_PATH are the
    # 1.6.1 frontend's, and a shared environment must not leak them into workers.
    Setting(
        "model_name",
        None,
        "served model name (public id); default: the model path's directory name",
        flag="--model-name",
    ),
    Setting(
        "model_path",
        None,
        "local directory with tokenizer.json, tokenizer_config.json, config.json",
        flag="--model-path",
    ),
    Setting(
        "served_model_name",
        None,
        "public model name, overriding --model-name",
        flag="--served-model-name",
    ),
    Setting(
        "endpoint_types",
        "DYN_ENDPOINT_TYPES",
        "endpoint types the model card advertises",
        flag="--endpoint-types",
    ),
    # Planes.
    Setting(
        "discovery_backend",
        "DYN_DISCOVERY_BACKEND",
        "where the worker registers",
        flag="--discovery-backend",
        choices=("etcd", "file", "kubernetes"),
    ),
    Setting(
        "request_plane",
        "DYN_REQUEST_PLANE",
        "how requests reach the worker",
        flag="--request-plane",
        choices=("tcp", "nats"),
    ),
    Setting(
        "event_plane",
        "DYN_EVENT_PLANE",
        "KV event plane; unset: zmq, as in Dynamo 1.6.1 (also when NATS_SERVER is set)",
        flag="--event-plane",
        choices=("nats", "zmq"),
    ),
    Setting(
        "disaggregation_mode",
        "DYN_DISAGGREGATION_MODE",
        "agg | prefill | decode",
        flag="--disaggregation-mode",
        parse=DisaggregationMode.parse,
    ),
    Setting(
        "health_check_payload",
        "DYN_HEALTH_CHECK_PAYLOAD",
        "JSON object or @file used as the health canary request",
        flag="--health-check-payload",
        to_field=values.parse_health_check_payload,
    ),
    Setting(
        "enable_kv_routing",
        None,
        "turn off KV event and snapshot publishing (the field is its negation)",
        flag="--disable-kv-routing",
        switch=True,
        negated=True,
    ),
    Setting(
        "migration_limit",
        None,  # DYN_MIGRATION_LIMIT is the 1.6.1 frontend's
        "frontend retries of a stream whose worker is lost (model card)",
        flag="--migration-limit",
        parse=int,
        to_field=int,
    ),
    Setting(
        "custom_jinja_template",
        "DYN_CUSTOM_JINJA_TEMPLATE",
        "chat template file that replaces the model's",
        flag="--custom-jinja-template",
    ),
    Setting(
        "tool_call_parser",
        "DYN_TOOL_CALL_PARSER",
        "frontend tool-call parser name (model card)",
        flag="--dyn-tool-call-parser",
        deprecated=("--tool-call-parser",),
        env_after_engine=True,
    ),
    Setting(
        "reasoning_parser",
        "DYN_REASONING_PARSER",
        "frontend reasoning parser name (model card)",
        flag="--dyn-reasoning-parser",
        deprecated=("--reasoning-parser",),
        env_after_engine=True,
    ),
    Setting(
        "exclude_tools_when_tool_choice_none",
        "DYN_EXCLUDE_TOOLS_WHEN_TOOL_CHOICE_NONE",
        "leave tool definitions out of the chat template when tool_choice is 'none' "
        "(model card); --no-exclude-tools-when-tool-choice-none turns it off",
        flag="--exclude-tools-when-tool-choice-none",
        parse=values.boolean,
        to_field=bool,
    ),
    Setting(
        "structural_tag",
        "DYN_STRUCTURAL_TAG",
        'structural-tag settings for tool calling: a JSON object (e.g. \'{"scope": "always"}\'), '
        "true (the defaults) or false; published in the model card",
        flag="--dyn-structural-tag",
        deprecated=("--structural-tag",),
        parse=values.structural_tag,
        bare="true",
        to_field=values.structural_tag_field,
    ),
    # Connections (environment only).
    Setting("etcd_endpoints", "ETCD_ENDPOINTS", "etcd URLs, comma list"),
    Setting("nats_server", "NATS_SERVER", "NATS URLs, comma list"),
    Setting(
        "file_kv",
        "DYN_FILE_KV",
        "file discovery root; unset: $TMPDIR/dynamo_store_kv",
    ),
    # Kubernetes discovery: the downward API gives the pod's identity (docs/wire-protocol.md).
    Setting("pod_name", "POD_NAME", "kubernetes discovery: this pod's name"),
    Setting("pod_namespace", "POD_NAMESPACE", "kubernetes discovery: this pod's namespace"),
    Setting("pod_uid", "POD_UID", "kubernetes discovery: this pod's uid (owner reference)"),
    Setting(
        "container_name",
        "CONTAINER_NAME",
        "kubernetes discovery, container mode: this container's name",
    ),
    Setting(
        "kube_discovery_mode",
        "DYN_KUBE_DISCOVERY_MODE",
        "kubernetes discovery: pod (one identity per pod) or container (one per container)",
    ),
    Setting(
        "kubeconfig",
        "KUBECONFIG",
        "kubernetes discovery: kubeconfig file; unset: the in-cluster service account",
    ),
    Setting("tcp_host", "DYN_TCP_RPC_HOST", "TCP request plane bind address"),
    Setting("tcp_port", "DYN_TCP_RPC_PORT", "TCP request plane port (0: any)", parse=int),
    Setting(
        "event_plane_host",
        "DYN_EVENT_PLANE_HOST",
        "ZMQ event plane: the address its sockets bind and advertise",
    ),
    Setting("system_host", "DYN_SYSTEM_HOST", "status server bind address"),
    Setting(
        "system_port",
        "DYN_SYSTEM_PORT",
        "status server port (/health, /live, /metrics, model files); unset or -1: no status server",
        parse=values.system_port,
        strict=True,
    ),
    Setting(
        "etcd.lease_ttl",
        "ETCD_LEASE_TTL",
        "etcd lease TTL in seconds",
        parse=values.lease_ttl,
        strict=True,
    ),
    Setting("etcd.username", "ETCD_AUTH_USERNAME", "etcd user"),
    Setting("etcd.password", "ETCD_AUTH_PASSWORD", "etcd password"),
    Setting("etcd.tls_ca", "ETCD_AUTH_CA", "etcd CA (PEM file or text); turns TLS on"),
    Setting("etcd.tls_client_cert", "ETCD_AUTH_CLIENT_CERT", "etcd client certificate"),
    Setting("etcd.tls_client_key", "ETCD_AUTH_CLIENT_KEY", "etcd client key"),
    Setting("nats.auth_token", "NATS_AUTH_TOKEN", "NATS token (instead of one in the URL)"),
    Setting("nats.tls_ca", "NATS_TLS_CA", "NATS CA bundle file; turns TLS on"),
    Setting("nats.tls_cert", "NATS_TLS_CERT", "NATS client certificate file"),
    Setting("nats.tls_key", "NATS_TLS_KEY", "NATS client key file"),
    # Serving.
    Setting(
        "request_plane_codec",
        "DYN_REQUEST_PLANE_CODEC",
        "payload codec advertised in the Endpoint record: json or msgpack",
        parse=values.codec,
    ),
    Setting(
        "max_message_size",
        "DYN_TCP_MAX_MESSAGE_SIZE",
        "longest request body in bytes (invalid or <= 0: the default)",
        parse=values.message_size,
    ),
    Setting(
        "engine_stream_timeout",
        "DYN_ENGINE_STREAM_TIMEOUT_SECS",
        "longest wait for the engine's next item, first included; unset or 0: no bound",
        parse=values.optional_seconds,
    ),
    Setting(
        "debug_validate",
        "DYN_DEBUG_VALIDATE",
        "check every engine stream against the stream rules (costs one read per stream)",
        parse=values.truthy,
    ),
    # Shutdown.
    Setting(
        "graceful_shutdown_grace_period",
        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",
        "seconds between leaving discovery and draining (at least 0.1)",
        parse=values.seconds,
    ),
    Setting(
        "graceful_shutdown_timeout",
        "DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT",
        "seconds in-flight streams get after the drain starts; then they are cancelled",
        parse=values.seconds,
    ),
    Setting(
        "graceful_shutdown_cleanup_timeout",
        "DYN_WORKER_SHUTDOWN_CLEANUP_TIMEOUT_SECS",
        "seconds engine.cleanup() may take; unset: the drain timeout. Past grace + drain + "
        "cleanup (+ 7 s of fixed steps) the process exits with code 124",
        parse=values.seconds,
    ),
    # Health canary.
    Setting(
        "health_check_enabled",
        "DYN_HEALTH_CHECK_ENABLED",
        "run the health canary by itself whenever the worker has been idle for "
        "DYN_CANARY_WAIT_TIME",
        parse=values.truthy,
    ),
    Setting(
        "canary_wait_time",
        "DYN_CANARY_WAIT_TIME",
        "seconds without a request before the canary runs",
        parse=values.seconds,
    ),
    Setting(
        "health_check_request_timeout",
        "DYN_HEALTH_CHECK_REQUEST_TIMEOUT",
        "seconds one canary may take",
        parse=values.seconds,
    ),
    # Observability.
    Setting(
        "log_filter",
        "DYN_LOG",
        "log filter: a level, or target=level pairs (backend_common=debug)",
    ),
    Setting(
        "logging_jsonl",
        "DYN_LOGGING_JSONL",
        "log JSON lines as Dynamo's workers write them",
        parse=values.truthy,
    ),
    Setting(
        "prometheus_multiproc_dir",
        "PROMETHEUS_MULTIPROC_DIR",
        "an engine's multiprocess Prometheus directory, served on /metrics",
    ),
    Setting(
        "tracing",
        "OTEL_EXPORT_ENABLED",
        "OpenTelemetry span per request (engine.generate), exported over OTLP",
        parse=values.truthy,
    ),
    Setting(
        "otel_service_name",
        "OTEL_SERVICE_NAME",
        "service.name of the exported spans",
    ),
    Setting(
        "otel_exporter_protocol",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTLP protocol of the span export: http/protobuf (the tracing extra's exporter) or "
        "grpc (needs opentelemetry-exporter-otlp-proto-grpc); OTEL_EXPORTER_OTLP_ENDPOINT "
        "and the other OTEL_EXPORTER_OTLP_* variables are read by the exporter itself",
        parse=values.otlp_protocol,
    ),
)


_BY_FIELD = {s.field: s for s in SETTINGS}


def by_field(field: str) -> Setting:
    """The row of ``WorkerConfig`` field ``field``."""
    return _BY_FIELD[field]
