"""``args.engine_args``: an engine kind's flags declared once, on its settings dataclass.

* every ``option`` field becomes one flag (``--field-name`` or its declared spellings) whose
  dest is the field and whose default is the field's, unless the caller replaces it;
* booleans are ``--x/--no-x`` pairs, or ``--x`` alone when declared a switch;
* the namespace builds the dataclass back; fields without a flag come from the caller;
* ``fraction`` states its interval and refuses values outside it, at both ends.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from backend_common.args.engine_args import (
    add_dataclass_args,
    dataclass_from_args,
    fraction,
    option,
    positive_int,
)


@dataclass(frozen=True)
class Demo:
    path: str = ""  # no flag: the caller supplies it
    blocks: int = option(16, parse=positive_int, flags=("--blocks-override", "--blocks"))
    share: float = option(0.5, parse=fraction(zero=False, one=True), help="a share, in (0, 1]")
    caching: bool = option(True)
    merge: bool = option(False, switch=True)
    device: str = option("cpu", choices=("cpu", "cuda"))


def _parse(argv: list[str], **defaults: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_dataclass_args(parser, Demo, "demo", defaults=defaults)
    return parser.parse_args(argv)


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert dataclass_from_args(Demo, _parse([]), path="p") == Demo(path="p")


def test_each_field_is_its_flag() -> None:
    args = _parse(["--blocks", "3", "--share", "1", "--no-caching", "--merge", "--device", "cuda"])
    assert dataclass_from_args(Demo, args) == Demo(
        blocks=3, share=1.0, caching=False, merge=True, device="cuda"
    )
    assert _parse(["--blocks-override", "7"]).blocks == 7


def test_a_caller_replaces_one_default_only() -> None:
    args = _parse([], device="cuda")
    assert (args.device, args.blocks) == ("cuda", 16)
    with pytest.raises(TypeError, match="no flag for"):
        _parse([], nonsense=1)


def test_a_switch_has_no_negative_spelling() -> None:
    with pytest.raises(SystemExit):
        _parse(["--no-merge"])


@pytest.mark.parametrize(
    ("zero", "one", "good", "bad", "interval"),
    [
        (True, False, ("0", "0.99"), ("1", "-0.1", "nan"), "[0, 1)"),
        (False, True, ("1", "0.01"), ("0", "1.5", "nan"), "(0, 1]"),
    ],
)
def test_a_fraction_means_one_interval(zero, one, good, bad, interval) -> None:
    parse = fraction(zero=zero, one=one)
    for text in good:
        assert parse(text) == float(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=rf"must be in \{interval[0]}0, 1"):
            parse(text)


def test_a_refused_value_is_a_usage_error() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_dataclass_args(parser, Demo, "demo")
    with pytest.raises(argparse.ArgumentError, match="must be in"):
        parser.parse_args(["--share", "0"])
    with pytest.raises(argparse.ArgumentError, match="positive integer"):
        parser.parse_args(["--blocks", "0"])


def test_only_dataclasses_declare_flags() -> None:
    with pytest.raises(TypeError, match="not a dataclass"):
        add_dataclass_args(argparse.ArgumentParser(), int, "x")
