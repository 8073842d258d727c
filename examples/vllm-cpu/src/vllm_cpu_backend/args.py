"""Command line of the worker: Dynamo's shared worker flags plus the engine's own.

``from_args(argv)`` is what ``VllmCpuBackendEngine.from_args`` delegates to; the worker
(``backend_common.run``) calls it once at startup. Every setting follows the same
precedence: flag > environment variable > default. The engine declares its own flags in
``VllmCpuBackendEngine.add_args(parser)`` and builds itself in
``VllmCpuBackendEngine.from_config(args, config)``, so this file stays template-owned and
``copier update`` can keep it current.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Final

from backend_common import DisaggregationMode, WorkerConfig
from backend_common.args import add_common_args, worker_config_from_args

from . import errors

if TYPE_CHECKING:
    from .engine import VllmCpuBackendEngine

__all__ = ["DEFAULT_REQUEST_PLANE", "SUPPORTED_MODES", "build_parser", "from_args"]

DEFAULT_REQUEST_PLANE: Final = "tcp"
"""The request plane chosen at generation; ``DYN_REQUEST_PLANE`` or ``--request-plane`` win."""

SUPPORTED_MODES = tuple(DisaggregationMode(role) for role in ["agg"])
"""The roles this engine serves (``--disaggregation-mode``)."""


def build_parser(engine_cls: type[VllmCpuBackendEngine]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_cpu_backend",
        description="vllm-cpu-backend: a Dynamo 1.6.x backend worker",
    )
    add_common_args(parser)
    parser.set_defaults(request_plane=os.environ.get("DYN_REQUEST_PLANE") or DEFAULT_REQUEST_PLANE)
    engine_cls.add_args(parser)
    return parser


def from_args(
    argv: list[str] | None = None, engine_cls: type[VllmCpuBackendEngine] | None = None
) -> tuple[VllmCpuBackendEngine, WorkerConfig]:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``) into a not-started engine and its config.

    Raises a typed ``InvalidArgument`` for a role this engine does not serve or an engine
    flag ``from_config`` rejects; argparse itself exits with status 2 on malformed flags.
    """
    if engine_cls is None:
        # Imported here, not at the top: engine.py imports this module for its from_args.
        from .engine import VllmCpuBackendEngine

        engine_cls = VllmCpuBackendEngine
    args = build_parser(engine_cls).parse_args(argv)
    config = worker_config_from_args(args)
    if config.disaggregation_mode not in SUPPORTED_MODES:
        raise errors.unsupported_mode(
            config.disaggregation_mode.value, [mode.value for mode in SUPPORTED_MODES]
        )
    return engine_cls.from_config(args, config), config
