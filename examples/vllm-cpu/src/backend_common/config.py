"""What an engine tells the worker (``EngineConfig``) and how it is set up (``WorkerConfig``).

``from_args`` returns a ``WorkerConfig`` built from the shared CLI flags and
environment variables (``args/``; ``args/environment.py`` is the only place the
environment is read);
``start()`` returns an ``EngineConfig`` with the facts only a running engine
knows (context length, KV block size, capacity). Every ``EngineConfig`` field
but ``model`` is optional: ``None`` means "not advertised".

``WorkerConfig`` holds every setting of the worker, transports and discovery
included; a ``WorkerConfig`` built in code gets the documented defaults, never
values from the environment. Its field defaults are the settings' defaults, stated only
here (``args.SETTINGS`` reads them). The reference of every flag and variable:
``python -m backend_common.args --markdown``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import invalid_arg

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DisaggregationMode",
    "EngineConfig",
    "EtcdOptions",
    "NatsOptions",
    "WorkerConfig",
]

DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024 * 1024
"""Longest request body the request plane accepts (Dynamo's ``DYN_TCP_MAX_MESSAGE_SIZE``)."""


class DisaggregationMode(StrEnum):
    AGGREGATED = "agg"
    PREFILL = "prefill"
    DECODE = "decode"
    ENCODE = "encode"

    @classmethod
    def parse(cls, value: str | DisaggregationMode) -> DisaggregationMode:
        if isinstance(value, DisaggregationMode):
            return value
        v = str(value).strip().lower()
        if v == "aggregated":
            v = "agg"
        for member in cls:
            if member.value == v:
                return member
        raise invalid_arg(
            f"unknown disaggregation mode '{value}' (expected one of: agg, prefill, decode, encode)"
        )

    @property
    def worker_type(self) -> str:
        """The model card's ``worker_type`` string."""
        return "aggregated" if self is DisaggregationMode.AGGREGATED else self.value


@dataclass
class EngineConfig:
    """Returned by ``LLMEngine.start``. ``model`` must be non-empty."""

    model: str
    served_model_name: str | None = None
    context_length: int | None = None
    kv_cache_block_size: int | None = None
    total_kv_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    data_parallel_size: int | None = None
    data_parallel_start_rank: int | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    runtime_data: dict[str, Any] | None = None
    model_aliases: list[str] = field(default_factory=list)
    # Token ids >= vocab_size are refused before generate (request_policy); None: unchecked.
    vocab_size: int | None = None


@dataclass
class NatsOptions:
    """How the worker authenticates to NATS (request plane and event plane).

    Credentials may also travel in ``WorkerConfig.nats_server`` URLs
    (``nats://user:password@host:port``). Any TLS field, or a ``tls://`` URL, turns TLS
    on; the files are checked when the connection is made.
    """

    auth_token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass
class EtcdOptions:
    """The etcd lease and credentials. TLS values are PEM file paths or inline PEM text."""

    lease_ttl: int = 10
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None


@dataclass
class WorkerConfig:
    """How the worker registers and serves. Built by ``from_args``; read by ``run``.

    Names and defaults follow Dynamo's ``CommonArgs`` / ``WorkerConfig``.
    """

    namespace: str = "dynamo"
    component: str = "backend"
    endpoint: str = "generate"
    model_name: str = ""
    model_path: str | None = None
    served_model_name: str | None = None
    endpoint_types: str = "chat,completions"
    discovery_backend: str = "etcd"
    request_plane: str = "tcp"
    event_plane: str | None = None
    disaggregation_mode: DisaggregationMode = DisaggregationMode.AGGREGATED
    custom_jinja_template: str | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = True
    structural_tag: dict[str, Any] | None = None
    enable_local_indexer: bool = True
    enable_kv_routing: bool = True
    migration_limit: int = 0
    health_check_payload: dict[str, Any] | None = None
    metrics_labels: list[tuple[str, str]] = field(default_factory=list)
    # Connection settings (flags or the usual env vars).
    etcd_endpoints: str = "http://localhost:2379"
    nats_server: str = "nats://localhost:4222"
    file_kv: str | None = None
    # Kubernetes discovery (discovery/kube.py): the pod identity from the downward API, the
    # per-container mode and an optional kubeconfig (unset: the in-cluster service account).
    pod_name: str | None = None
    pod_namespace: str | None = None
    pod_uid: str | None = None
    container_name: str | None = None
    kube_discovery_mode: str = "pod"
    kubeconfig: str | None = None
    tcp_host: str = "127.0.0.1"
    tcp_port: int = 0
    # Host of the ZMQ event plane's PUB sockets: bound and advertised (DYN_EVENT_PLANE_HOST).
    event_plane_host: str = "127.0.0.1"
    system_host: str = "127.0.0.1"
    system_port: int | None = None
    etcd: EtcdOptions = field(default_factory=EtcdOptions)
    nats: NatsOptions = field(default_factory=NatsOptions)
    # Request plane and serving.
    request_plane_codec: str = "json"
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    engine_stream_timeout: float | None = None
    debug_validate: bool = False
    # Shutdown (see docs/architecture.md#shutdown-sequence).
    graceful_shutdown_grace_period: float = 5.0
    graceful_shutdown_timeout: float = 30.0
    # None: the graceful shutdown timeout. Past grace + timeout + cleanup (+ the worker's fixed
    # steps) the process exits with code 124 (runtime/worker.py).
    graceful_shutdown_cleanup_timeout: float | None = None
    # Health canary (runtime/health.py): runs by itself on a worker idle for canary_wait_time.
    health_check_enabled: bool = False
    canary_wait_time: float = 10.0
    health_check_request_timeout: float = 3.0
    # Observability.
    log_filter: str = "info"
    logging_jsonl: bool = False
    # An engine's multiprocess metrics directory, served on /metrics (runtime/engine_metrics.py).
    prometheus_multiproc_dir: str | None = None
    tracing: bool = False
    otel_service_name: str = "backend_common"
    otel_exporter_protocol: str = "http/protobuf"

    def __post_init__(self) -> None:
        self.disaggregation_mode = DisaggregationMode.parse(self.disaggregation_mode)
        if self.request_plane_codec not in ("json", "msgpack"):
            raise invalid_arg(
                f"unknown request plane codec '{self.request_plane_codec}' "
                "(expected json or msgpack)"
            )
        if self.discovery_backend not in ("etcd", "file", "kubernetes"):
            raise invalid_arg(
                f"unknown discovery backend '{self.discovery_backend}' "
                "(expected etcd, file or kubernetes)"
            )
        if self.kube_discovery_mode not in ("pod", "container"):
            raise invalid_arg(
                f"invalid DYN_KUBE_DISCOVERY_MODE value '{self.kube_discovery_mode}' "
                "(expected pod or container)"
            )
        if self.request_plane not in ("tcp", "nats"):
            raise invalid_arg(
                f"unknown request plane '{self.request_plane}' (expected tcp or nats)"
            )

    @property
    def public_name(self) -> str:
        """The name clients use, as known before the engine started (``display_name()``)."""
        return self.display_name()

    def display_name(self, engine: EngineConfig | None = None) -> str:
        """The name clients use for the model: the one rule, with or without the engine's view.

        First set of: ``served_model_name``, the engine's ``served_model_name``,
        ``model_name``, the engine's ``model``. The model card's ``display_name``, the
        worker's metric label and its "Serving" line all use it.
        """
        return (
            self.served_model_name
            or (engine.served_model_name if engine is not None else None)
            or self.model_name
            or (engine.model if engine is not None else "")
        )
