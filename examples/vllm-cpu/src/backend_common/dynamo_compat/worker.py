"""1.6.1's ``WorkerConfig`` (``dynamo.common.backend.worker``) and its mapping onto ours.

A 1.6.1 engine's ``from_args`` returns this ``WorkerConfig``: 1.6.1's fields, defaults and
positional order. ``to_native()`` turns it into ``backend_common.WorkerConfig`` field by
field; every setting 1.6.1 leaves to its runtime's environment (etcd and NATS addresses,
file discovery path, TCP host and port, shutdown timings, logging, tracing, the status
port) is read the way our own engines read it, through ``backend_common.args``. Fields with
no equivalent here raise ``InvalidArgument`` naming the field when set to anything but
their default (the table in docs/dynamo-compat.md); ``use_kv_events`` is ignored with a
``DeprecationWarning``, as 1.6.1 does.

``launch.Worker(engine, config)`` serves an engine with it (1.6.1's ``Worker`` shim).
"""

from __future__ import annotations

import argparse
import enum
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..args import add_common_args, parse_health_check_payload, worker_config_from_args
from ..config import DisaggregationMode
from ..config import WorkerConfig as NativeWorkerConfig
from ..errors import invalid_arg
from .core import ModelInput

__all__ = ["WorkerConfig"]


def _coerce_disaggregation_mode(value: Any) -> DisaggregationMode:
    """``None``: aggregated; our enum passes; another enum maps by member name; else TypeError."""
    if value is None:
        return DisaggregationMode.AGGREGATED
    if isinstance(value, DisaggregationMode):
        return value
    if isinstance(value, enum.Enum) and value.name in DisaggregationMode.__members__:
        return DisaggregationMode[value.name]
    raise TypeError(
        f"disaggregation_mode is {type(value).__name__}({value!r}); "
        "expected dynamo.common.constants.DisaggregationMode"
    )


@dataclass
class WorkerConfig:
    """1.6.1's worker settings; keep the order (1.6.1 engines construct it positionally)."""

    namespace: str
    component: str = "backend"
    endpoint: str = "generate"
    model_name: str = ""
    served_model_name: str | None = None
    model_input: ModelInput = ModelInput.Tokens
    endpoint_types: str = "chat,completions"
    discovery_backend: str = "etcd"
    request_plane: str = "tcp"
    event_plane: str | None = None
    use_kv_events: bool = False
    custom_jinja_template: str | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = True
    enable_local_indexer: bool = True
    enable_kv_routing: bool = True
    metrics_labels: list[tuple[str, str]] = field(default_factory=list)
    disaggregation_mode: DisaggregationMode = DisaggregationMode.AGGREGATED
    health_check_payload: dict[str, Any] | None = None
    structural_tag: dict[str, object] | None = None
    route_to_encoder: bool = False
    media_decoder: Any = None
    media_fetcher: Any = None
    kv_state_endpoint: str | None = None
    default_thinking_mode: str | None = None
    response_plane: str = "tcp"

    @classmethod
    def from_runtime_config(
        cls,
        runtime_cfg: Any,
        model_name: str,
        served_model_name: str | None = None,
        model_input: ModelInput | None = None,
        **overrides: Any,
    ) -> WorkerConfig:
        """Build from any object with 1.6.1's ``DynamoRuntimeConfig`` attributes; overrides win."""
        kwargs: dict[str, Any] = {
            "namespace": runtime_cfg.namespace,
            "component": getattr(runtime_cfg, "component", None) or "backend",
            "endpoint": getattr(runtime_cfg, "endpoint", None) or "generate",
            "kv_state_endpoint": getattr(runtime_cfg, "kv_state_endpoint", None),
            "model_name": model_name,
            "served_model_name": served_model_name,
            "endpoint_types": getattr(runtime_cfg, "endpoint_types", "chat,completions"),
            "discovery_backend": runtime_cfg.discovery_backend,
            "request_plane": runtime_cfg.request_plane,
            "response_plane": getattr(runtime_cfg, "response_plane", "tcp"),
            "event_plane": runtime_cfg.event_plane,
            "use_kv_events": getattr(runtime_cfg, "use_kv_events", False),
            "custom_jinja_template": getattr(runtime_cfg, "custom_jinja_template", None),
            "tool_call_parser": getattr(runtime_cfg, "dyn_tool_call_parser", None),
            "reasoning_parser": getattr(runtime_cfg, "dyn_reasoning_parser", None),
            "default_thinking_mode": getattr(runtime_cfg, "dyn_default_thinking_mode", None),
            "exclude_tools_when_tool_choice_none": getattr(
                runtime_cfg, "exclude_tools_when_tool_choice_none", True
            ),
            "enable_local_indexer": getattr(runtime_cfg, "enable_local_indexer", True),
            "enable_kv_routing": getattr(runtime_cfg, "enable_kv_routing", True),
            "structural_tag": getattr(runtime_cfg, "structural_tag", None),
            "route_to_encoder": getattr(runtime_cfg, "route_to_encoder", False),
        }
        if "disaggregation_mode" not in overrides:
            kwargs["disaggregation_mode"] = _coerce_disaggregation_mode(
                getattr(
                    runtime_cfg,
                    "disaggregation_mode",
                    getattr(runtime_cfg, "serving_mode", None),
                )
            )
        if model_input is not None:
            kwargs["model_input"] = model_input
        kwargs["health_check_payload"] = parse_health_check_payload(
            getattr(runtime_cfg, "health_check_payload", None)
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def unmapped(self) -> list[str]:
        """Fields set to a value this runtime cannot serve, as ``name=value`` (empty: none)."""
        out = []
        if self.model_input is not ModelInput.Tokens:
            out.append(f"model_input={self.model_input!r} (only ModelInput.Tokens)")
        for name in (
            "media_decoder",
            "media_fetcher",
            "kv_state_endpoint",
            "default_thinking_mode",
        ):
            if getattr(self, name) is not None:
                out.append(f"{name}={getattr(self, name)!r}")
        if self.route_to_encoder:
            out.append("route_to_encoder=True")
        if self.response_plane != "tcp":
            out.append(f"response_plane={self.response_plane!r} (only tcp)")
        return out

    def to_native(self) -> NativeWorkerConfig:
        """Our ``WorkerConfig``: these fields, plus the environment for the rest (see above).

        Raises ``InvalidArgument`` naming every field without an equivalent (``unmapped``).
        """
        unmapped = self.unmapped()
        if unmapped:
            raise invalid_arg(
                "WorkerConfig fields with no equivalent on this runtime: " + ", ".join(unmapped)
            )
        if self.use_kv_events:
            warnings.warn(
                "WorkerConfig.use_kv_events is deprecated and ignored (as in Dynamo 1.6.1): "
                "the event plane setting decides where KV events go",
                DeprecationWarning,
                stacklevel=2,
            )
        parser = argparse.ArgumentParser(add_help=False)
        add_common_args(parser)
        from_env = parser.parse_args([])
        overrides: dict[str, Any] = {
            "namespace": self.namespace,
            "component": self.component,
            "endpoint": self.endpoint,
            "model_name": self.model_name,
            "served_model_name": self.served_model_name,
            "endpoint_types": self.endpoint_types,
            "discovery_backend": self.discovery_backend,
            "request_plane": self.request_plane,
            "event_plane": self.event_plane,
            "custom_jinja_template": self.custom_jinja_template,
            "tool_call_parser": self.tool_call_parser,
            "reasoning_parser": self.reasoning_parser,
            "exclude_tools_when_tool_choice_none": self.exclude_tools_when_tool_choice_none,
            "enable_local_indexer": self.enable_local_indexer,
            "enable_kv_routing": self.enable_kv_routing,
            "metrics_labels": list(self.metrics_labels),
            "disaggregation_mode": _coerce_disaggregation_mode(self.disaggregation_mode),
        }
        # None means "not set by the engine": the operator's environment value stays.
        if self.health_check_payload is not None:
            overrides["health_check_payload"] = self.health_check_payload
        if self.structural_tag is not None:
            overrides["structural_tag"] = self.structural_tag
        return worker_config_from_args(from_env, **overrides)
