"""Logging set-up from a ``DYN_LOG`` filter (Dynamo's syntax; ``RUST_LOG`` is not read).

``DYN_LOG`` is a comma list: a bare level sets the root level, ``target=level``
sets one logger (``backend_common=debug``). Levels: error, warn, info, debug,
trace (= debug). Default ``info``. ``run`` calls ``configure_logging`` with
``DYN_LOG`` before ``from_args``, and again if the ``WorkerConfig`` it got names
another filter.

``jsonl`` (``DYN_LOGGING_JSONL``) writes one JSON object per line on stderr, the way a
Dynamo 1.6.1 worker writes a Python record (through its Rust logger):
``{"time": "<UTC, microseconds>Z", "level": "INFO", "target": "log", "message": ...,
"log.file": <path>, "log.line": <n>, "log.target": "<module>.<function>"}``; levels are
ERROR, WARN, INFO, DEBUG; an exception's traceback follows the message after a newline.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

__all__ = ["JsonlFormatter", "configure_logging"]

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


_JSONL_LEVELS = {"WARNING": "WARN", "CRITICAL": "ERROR"}


class JsonlFormatter(logging.Formatter):
    """One JSON object per record, with Dynamo 1.6.1's keys (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            message += "\n" + self.formatException(record.exc_info)
        if record.funcName == "<module>":
            module_path = record.module
        else:
            module_path = f"{record.module}.{record.funcName}"
        created = datetime.fromtimestamp(record.created, tz=UTC)
        entry = {
            "time": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": _JSONL_LEVELS.get(record.levelname, record.levelname),
            "target": "log",
            "message": message,
            "log.file": record.pathname,
            "log.line": record.lineno,
            "log.target": module_path,
        }
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(spec: str = "info", *, jsonl: bool = False) -> None:
    """Apply the filter ``spec`` (``WorkerConfig.log_filter``) and the format (``jsonl``:
    ``WorkerConfig.logging_jsonl``); see the module docstring."""
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
    if jsonl:
        handler.setFormatter(JsonlFormatter())
    else:
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
