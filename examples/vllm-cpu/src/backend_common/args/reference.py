"""``docs/settings.md``: the settings reference, generated from ``SETTINGS``.

``python -m backend_common.args --markdown`` prints it (``__main__.py``); without
``--markdown`` the command prints the worker's flags as ``--help`` shows them.
"""

from __future__ import annotations

import argparse
import sys

from .parser import add_common_args
from .table import SETTINGS, Setting

__all__ = ["main", "settings_markdown"]


def _shown_default(s: Setting) -> str:
    default = s.flag_default if s.switch else s.default
    if default is None:
        return "unset"
    if default == "":
        return "empty"
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"`{default}`"


def settings_markdown() -> str:
    """``docs/settings.md``: every setting's flag, variable, default, field and meaning."""
    lines = [
        "# Worker settings",
        "",
        "Every setting of a worker, generated from `backend_common.args.SETTINGS`: this file is",
        "the output of `python -m backend_common.args --markdown`. A flag beats its environment",
        "variable, which beats the default; an empty variable counts as unset. The Dynamo 1.6.x",
        "names and defaults are kept. `backend_common.args` reads them once, in `from_args`, into",
        "`WorkerConfig`; a `WorkerConfig` built in code gets the defaults and never reads the",
        "environment. Fields marked `etcd.` / `nats.` live in `WorkerConfig.etcd` / `.nats`.",
        "",
        "| Flag | Environment variable | Default | `WorkerConfig` field | Meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        flag = ", ".join(f"`{f}`" for f in (s.flag, *s.aliases) if f) or "—"
        if s.deprecated:
            flag += " (old: " + ", ".join(f"`{f}`" for f in s.deprecated) + ")"
        env = f"`{s.env}`" if s.env else "—"
        meaning = s.help.replace("|", "\\|")
        lines.append(f"| {flag} | {env} | {_shown_default(s)} | `{s.field}` | {meaning} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m backend_common.args [--markdown]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m backend_common.args", description="the worker's settings"
    )
    parser.add_argument("--markdown", action="store_true", help="print the reference table")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(settings_markdown())
    else:
        add_common_args(argparse.ArgumentParser(prog="worker")).print_help()
    return 0
