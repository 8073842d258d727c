"""Logging set-up from a ``DYN_LOG`` filter (Dynamo's syntax; ``RUST_LOG`` is not read).

``DYN_LOG`` is a comma list: a bare level sets the root level, ``target=level``
sets one logger (``backend_common=debug``). Levels: error, warn, info, debug,
trace (= debug). Default ``info``. ``run`` calls ``configure_logging`` with
``DYN_LOG`` before ``from_args``, and again if the ``WorkerConfig`` it got names
another filter.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]

_LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
    "off": logging.CRITICAL + 10,
}


def _level(name: str) -> int | None:
    return _LEVELS.get(name.strip().lower())


def configure_logging(spec: str = "info") -> None:
    """Apply the filter ``spec`` (``WorkerConfig.log_filter``; see the module docstring)."""
    root_level = logging.INFO
    targets: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "=" in part:
            target, _, level = part.partition("=")
            lvl = _level(level)
            if lvl is not None:
                targets[target.strip().replace("::", ".")] = lvl
        else:
            lvl = _level(part)
            if lvl is not None:
                root_level = lvl
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(root_level)
    for target, lvl in targets.items():
        logging.getLogger(target).setLevel(lvl)
    # Third-party chatter stays at warning unless asked for explicitly.
    for noisy in ("aiohttp.access", "grpc", "nats"):
        if noisy not in targets:
            logging.getLogger(noisy).setLevel(max(root_level, logging.WARNING))
