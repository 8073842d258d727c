"""The worker's settings: Dynamo's worker flags and environment variables, same names and defaults.

A backend builds one ``argparse`` parser, calls ``add_common_args(parser)``, adds its own
flags next to them, and turns the parsed namespace into a ``WorkerConfig`` with
``worker_config_from_args(args)``, which also reads the settings that have no flag.
Precedence for every setting: flag > environment variable > default. ``run`` additionally
reads ``DYN_LOG`` through ``log_filter_from_env`` before ``from_args``, so that argument
parsing itself logs with the operator's filter.

``SETTINGS`` lists every setting once (field, flag, variable, meaning; the default is the
``WorkerConfig`` field's); the parser, the environment reads and the reference
(``python -m backend_common.args --markdown``, ``settings_markdown()``) all come from it.
An engine kind declares its own flags on a dataclass with ``engine_args``.

Modules, one concept each:

* ``table``: ``Setting`` and the ``SETTINGS`` rows;
* ``values``: the value parsers the rows name (text to value);
* ``environment``: the only reader of ``os.environ`` in the runtime;
* ``parser``: ``add_common_args`` and ``worker_config_from_args``, both a loop over the rows;
* ``flags``: sharing one parser with an engine's flags (argparse conflict handling);
* ``reference``: ``docs/settings.md`` (``settings_markdown``) and the command;
* ``engine_args``: an engine kind's flags from a dataclass's fields.
"""

from __future__ import annotations

from .environment import (
    PREFILL_DRAIN_TIMEOUT_S,
    health_check_payload_from_env,
    log_filter_from_env,
    logging_jsonl_from_env,
    prefill_drain_timeout_from_env,
)
from .parser import add_common_args, worker_config_from_args
from .reference import settings_markdown
from .table import SETTINGS, Setting
from .values import parse_health_check_payload

__all__ = [
    "PREFILL_DRAIN_TIMEOUT_S",
    "SETTINGS",
    "Setting",
    "add_common_args",
    "health_check_payload_from_env",
    "log_filter_from_env",
    "logging_jsonl_from_env",
    "parse_health_check_payload",
    "prefill_drain_timeout_from_env",
    "settings_markdown",
    "worker_config_from_args",
]
