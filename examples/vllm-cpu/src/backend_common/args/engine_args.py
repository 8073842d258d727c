"""An engine kind's own flags, declared once on its settings dataclass.

An engine kind keeps its settings in a frozen dataclass; each field that has a flag is
declared with ``option(...)`` (its default, help, parser and, when not ``--field-name``,
its spellings). Then:

* ``add_dataclass_args(parser, Settings, title)`` adds one flag per ``option`` field, in
  field order, to a group of ``parser`` (the engine's ``add_args``, next to
  ``add_common_args``). ``defaults`` replaces a field's default for this parser (a
  generated project's accelerator, say) without restating the others;
* ``dataclass_from_args(Settings, args, **given)`` builds the dataclass from the parsed
  namespace (the engine's ``from_config``); ``given`` supplies the fields without a flag.

The flag's dest is the field name, so a field is named once. A ``bool`` field is an
``--x`` / ``--no-x`` pair unless declared ``switch=True`` (``--x`` only). The parsers below
raise ``argparse.ArgumentTypeError``, which argparse reports as a usage error (exit 2)
naming the flag. Engine kinds' flags have no environment variables; the worker's settings
(``table.py``) do.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "Option",
    "add_dataclass_args",
    "dataclass_from_args",
    "fraction",
    "non_negative_float",
    "non_negative_int",
    "option",
    "positive_int",
]

T = TypeVar("T")

_KEY = "backend_common.flag"


@dataclass(frozen=True)
class Option:
    """How a settings field appears on the command line (kept in the field's metadata)."""

    help: str | None = None
    parse: Callable[[str], Any] | None = None
    flags: tuple[str, ...] = ()  # spellings; empty: --field-name
    choices: tuple[str, ...] | None = None
    switch: bool = False


def option(
    default: Any,
    *,
    help: str | None = None,  # noqa: A002 - argparse's own keyword
    parse: Callable[[str], Any] | None = None,
    flags: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    switch: bool = False,
) -> Any:
    """A dataclass field with ``default`` that ``add_dataclass_args`` turns into a flag."""
    spec = Option(help=help, parse=parse, flags=flags, choices=choices, switch=switch)
    return dataclasses.field(default=default, metadata={_KEY: spec})


def _options(cls: type) -> list[tuple[dataclasses.Field[Any], Option]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> argparse.ArgumentParser:
    """Add a flag for every ``option`` field of dataclass ``cls`` to a ``title`` group."""
    overrides = dict(defaults or {})
    group = parser.add_argument_group(title)
    for f, spec in _options(cls):
        kwargs: dict[str, Any] = {"dest": f.name, "default": overrides.pop(f.name, f.default)}
        if spec.help is not None:
            kwargs["help"] = spec.help
        if spec.switch:
            kwargs["action"] = "store_true"
        elif isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if spec.parse is not None:
                kwargs["type"] = spec.parse
            if spec.choices is not None:
                kwargs["choices"] = spec.choices
        group.add_argument(*(spec.flags or ("--" + f.name.replace("_", "-"),)), **kwargs)
    if overrides:
        raise TypeError(f"{cls.__name__} has no flag for {sorted(overrides)}")
    return parser


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """``cls`` with every ``option`` field from ``args`` and the rest from ``given``."""
    values = {f.name: getattr(args, f.name) for f, _ in _options(cls)}
    return cls(**values, **given)


# -- parsers -----------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """An integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0 (NaN refused)."""
    value = float(text)
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(*, zero: bool, one: bool) -> Callable[[str], float]:
    """A share between 0 and 1; ``zero`` / ``one`` say whether 0 and 1 themselves are allowed.

    Each use states its own interval (``[0, 1)``: "may be none, never all"; ``(0, 1]``:
    "some, at most all"), and the refusal message names it.
    """
    interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"

    def parse(text: str) -> float:
        value = float(text)
        low_ok = value >= 0.0 if zero else value > 0.0
        high_ok = value <= 1.0 if one else value < 1.0
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = f"fraction in {interval}"
    return parse
