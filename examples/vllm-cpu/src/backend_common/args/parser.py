"""Dynamo's worker flags on a parser, and the parsed namespace to a ``WorkerConfig``.

A backend builds one ``argparse`` parser, calls ``add_common_args(parser)``, adds its own
flags next to them, and turns the parsed namespace into a ``WorkerConfig`` with
``worker_config_from_args(args)``, which also reads the settings that have no flag. Both
walk ``SETTINGS`` (``table.py``) row by row; nothing here names a setting. Precedence for
every setting: flag > environment variable > default.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import WorkerConfig
from . import values
from .environment import from_env, parse_text, variable_text
from .flags import add_deprecated_alias, add_flag, adopt_engine_flag, setting_value, watch_parser
from .table import SETTINGS, Setting, sub_object_type

__all__ = ["add_common_args", "worker_config_from_args"]


def _flag_kwargs(s: Setting) -> dict[str, Any]:
    """``add_argument`` keywords of ``s``'s flag; its default is the variable, else the field's."""
    raw = None if s.env_after_engine else variable_text(s)
    kwargs: dict[str, Any] = {"dest": s.dest, "help": s.help}
    if s.switch:
        kwargs.update(
            action="store_true", default=values.truthy(raw) if raw is not None else s.flag_default
        )
        return kwargs
    if isinstance(s.default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
        kwargs["default"] = s.default if raw is None else parse_text(s, raw)
    else:
        # argparse runs ``type`` over a string default too: the variable is parsed as the flag.
        kwargs["default"] = s.default if raw is None else raw
        if s.parse is not None:
            kwargs["type"] = s.parse
    if s.choices:
        kwargs["choices"] = list(s.choices)
    if s.bare is not None:
        kwargs.update(nargs="?", const=s.bare)
    return kwargs


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
        kwargs = _flag_kwargs(s)
        add_flag(parser, g, s.flag, *s.aliases, setting=s.field, **kwargs)
        typed = {"type": kwargs["type"]} if "type" in kwargs else {}
        for old in s.deprecated:
            add_deprecated_alias(parser, g, old, new=s.flag, setting=s.field, dest=s.dest, **typed)
    # An engine's --model (vLLM) names the model directory too.
    adopt_engine_flag(parser, "--model", setting="model_path")
    watch_parser(parser)
    return parser


def _resolve(s: Setting, args: argparse.Namespace) -> Any:
    """``s``'s field value: its flag (or the engine's), its variable, or the field's default."""
    if s.flag is None:
        value = from_env(s)
    else:
        value = setting_value(args, s.field, s.dest)
        if value is None and s.env_after_engine:
            value = from_env(s)
        if value is None:
            value = s.flag_default
        if s.negated:
            value = not value
    return value if s.to_field is None else s.to_field(value)


def worker_config_from_args(args: argparse.Namespace, **overrides: Any) -> WorkerConfig:
    """Build the ``WorkerConfig`` from parsed common args plus the environment-only settings.

    A setting whose flag the engine defines is read from the engine's flag (``flags.py``).
    ``overrides`` (field names) replace what was resolved.
    """
    fields: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for s in SETTINGS:
        head, _, rest = s.field.rpartition(".")
        (groups.setdefault(head, {}) if head else fields)[rest] = _resolve(s, args)
    for head, group in groups.items():
        fields[head] = sub_object_type(head)(**group)
    # The one default that depends on another setting: the model path's directory name.
    if not fields["model_name"] and fields["model_path"]:
        fields["model_name"] = Path(fields["model_path"]).name
    fields.update(overrides)
    return WorkerConfig(**fields)
