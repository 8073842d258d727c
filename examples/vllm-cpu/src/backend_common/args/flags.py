"""Dynamo's worker flags on a parser that an engine also fills: the engine's definitions win.

An engine such as vLLM or SGLang already defines ``--model-path``, ``--served-model-name``,
``--tool-call-parser``, ``--reasoning-parser`` ... on its own parser. ``add_common_args``
(``parser.py``) adds Dynamo's flags through ``add_flag``, which never adds an option string
the parser already has, in either order:

* engine flags added first: Dynamo's flag is skipped (or only its taken spelling is);
* engine flags added after ``add_common_args``: the option string is taken away from
  Dynamo's action at that moment (argparse's own "resolve" handling, applied to Dynamo's
  actions only; a conflict between two engine flags is still argparse's error).

Either way the engine's action is recorded as a *source* of the Dynamo setting and
``setting_value(args, setting)`` reads it: an explicit Dynamo value first, then the
engine's, then the caller's environment/default. A conflict that cannot be resolved (one
definition takes a value and the other does not) raises a typed ``InvalidArgument`` whose
one-line message names both definitions.

The record lives in the parsed namespace under ``SOURCES_DEST`` (a parser default), so
``worker_config_from_args(args)`` needs only the namespace.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from typing import Any

from ..errors import invalid_arg

__all__ = [
    "SOURCES_DEST",
    "add_deprecated_alias",
    "add_flag",
    "adopt_engine_flag",
    "setting_value",
    "watch_parser",
]

log = logging.getLogger(__name__)

SOURCES_DEST = "_dynamo_flag_sources"
"""Namespace attribute: ``{setting: [engine dest, ...]}`` for settings an engine flag feeds."""

# Marks an action as Dynamo's (the value is the setting it carries).
_OWNER = "dynamo_setting"


def _sources(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    sources = parser.get_default(SOURCES_DEST)
    if sources is None:
        sources = {}
        parser.set_defaults(**{SOURCES_DEST: sources})
    return sources


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _describe(action: argparse.Action, who: str) -> str:
    kind = "takes a value" if _takes_value(action) else "takes no value"
    return f"{who} {'/'.join(action.option_strings) or action.dest} ({kind}, dest={action.dest})"


def _record_engine_source(
    parser: argparse.ArgumentParser, setting: str, ours: argparse.Action, theirs: argparse.Action
) -> None:
    if _takes_value(ours) != _takes_value(theirs):
        raise invalid_arg(
            "conflicting flag definitions: "
            f"{_describe(theirs, 'the engine defines')} and "
            f"{_describe(ours, 'the Dynamo worker defines')}; rename one of them"
        )
    dests = _sources(parser).setdefault(setting, [])
    if theirs.dest not in dests:
        dests.append(theirs.dest)
    log.debug("flag %s: the engine's definition wins (dest=%s)", ours.option_strings, theirs.dest)


def add_flag(
    parser: argparse.ArgumentParser,
    group: argparse._ArgumentGroup,
    *names: str,
    setting: str,
    **kwargs: Any,
) -> argparse.Action | None:
    """Add Dynamo's flag with the spellings in ``names`` the parser does not have yet.

    Spellings the engine already defined feed ``setting`` from the engine's action. Returns
    the added action, or None when every spelling belonged to the engine.
    """
    taken = [n for n in names if n in parser._option_string_actions]
    free = [n for n in names if n not in taken]
    probe = argparse.Action(option_strings=list(names), dest=setting, **_shape(kwargs))
    for name in taken:
        _record_engine_source(parser, setting, probe, parser._option_string_actions[name])
    if not free:
        return None
    action = group.add_argument(*free, **kwargs)
    setattr(action, _OWNER, setting)
    return action


def _shape(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``nargs`` an ``add_argument(**kwargs)`` call would produce (enough for _takes_value)."""
    action = kwargs.get("action")
    if action in ("store_true", "store_false", "store_const", "count", "help", "version"):
        return {"nargs": 0}
    if isinstance(action, type) and issubclass(action, argparse.BooleanOptionalAction):
        return {"nargs": 0}
    return {"nargs": kwargs.get("nargs")}


class _DeprecatedSpelling(argparse._StoreAction):
    """A hidden old spelling: stores like the new flag and logs a deprecation warning."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs):
        self._new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        log.warning("%s is deprecated; use %s", option_string, self._new)
        super().__call__(parser, namespace, values, option_string)


def add_deprecated_alias(
    parser: argparse.ArgumentParser,
    group: argparse._ArgumentGroup,
    old: str,
    *,
    new: str,
    setting: str,
    dest: str,
    **kwargs: Any,
) -> None:
    """Accept ``old`` (a value-taking flag) as a hidden spelling of ``new`` for one release.

    When the engine defines ``old`` itself, the engine's flag wins and feeds ``setting``.
    """
    add_flag(
        parser,
        group,
        old,
        setting=setting,
        dest=dest,
        action=_DeprecatedSpelling,
        new=new,
        help=argparse.SUPPRESS,
        **kwargs,
    )


def adopt_engine_flag(parser: argparse.ArgumentParser, name: str, *, setting: str) -> None:
    """Read ``setting`` also from the engine's ``name`` flag (vLLM's ``--model``), if defined.

    Dynamo does not define ``name``; an engine that defines it (before or after
    ``add_common_args``) feeds ``setting`` when Dynamo's own flag is not given.
    """
    parser._dynamo_adopted = {**getattr(parser, "_dynamo_adopted", {}), name: setting}  # type: ignore[attr-defined]
    existing = parser._option_string_actions.get(name)
    if existing is not None and not hasattr(existing, _OWNER):
        dests = _sources(parser).setdefault(setting, [])
        if existing.dest not in dests:
            dests.append(existing.dest)


def watch_parser(parser: argparse.ArgumentParser) -> None:
    """Let flags the engine adds later take their spellings from Dynamo's actions.

    Installed once by ``add_common_args``. Only conflicts with Dynamo-owned actions are
    resolved; every other conflict goes through argparse's own handler unchanged.
    """
    if getattr(parser, "_dynamo_watched", False):
        return
    parser._dynamo_watched = True  # type: ignore[attr-defined]
    _watch(parser, parser)
    for group in parser._action_groups:
        _watch(parser, group)
    add_group = parser.add_argument_group

    def add_argument_group(*args: Any, **kwargs: Any) -> argparse._ArgumentGroup:
        group = add_group(*args, **kwargs)
        _watch(parser, group)
        return group

    parser.add_argument_group = add_argument_group  # type: ignore[method-assign]


def _watch(parser: argparse.ArgumentParser, container: argparse._ActionsContainer) -> None:
    check = container._check_conflict

    def check_conflict(action: argparse.Action) -> None:
        ours = [
            (name, container._option_string_actions[name])
            for name in action.option_strings
            if hasattr(container._option_string_actions.get(name), _OWNER)
        ]
        for _name, existing in ours:
            _record_engine_source(parser, getattr(existing, _OWNER), existing, action)
        adopted = getattr(parser, "_dynamo_adopted", {})
        for name in action.option_strings:
            if name in adopted:
                dests = _sources(parser).setdefault(adopted[name], [])
                if action.dest not in dests:
                    dests.append(action.dest)
        if ours:
            container._handle_conflict_resolve(action, ours)
        check(action)

    container._check_conflict = check_conflict  # type: ignore[method-assign]


def setting_value(args: argparse.Namespace, setting: str, dest: str | None = None) -> Any:
    """The value of ``setting``: Dynamo's own ``dest`` if not None, else the engine's flags'.

    Engine values that are lists (vLLM's ``--served-model-name`` takes several names) give
    their first element. None when nothing set it: the caller applies env and default.
    """
    value = _first(getattr(args, dest or setting, None))
    if value is not None:
        return value
    for engine_dest in _engine_dests(args, setting):
        value = _first(getattr(args, engine_dest, None))
        if value is not None and value != "":  # vLLM's "no parser" default is ""
            return value
    return None


def _first(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return value


def _engine_dests(args: argparse.Namespace, setting: str) -> Iterable[str]:
    sources = getattr(args, SOURCES_DEST, None) or {}
    return sources.get(setting, ())
