"""``DYN_LOGGING_JSONL=1``: JSON log lines with the keys and shapes a Dynamo 1.6.1 worker writes.

The same script logs through ``backend_common.log`` and through the real 1.6.1 package's
``configure_dynamo_logging`` (the frontend's virtual environment); the lines must agree in
keys, key order and value shapes, and in content except the timestamp.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import RUNTIME_SRC, require_frontend

SCRIPT = """
import logging, sys
{setup}
log = logging.getLogger("backend_common.worker")
def serve():
    log.info("Serving %s on %s", "m", "ns.c.e")
serve()
log.warning("lease lost")
log.debug("hidden at info")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("a.b").exception("failed")
"""
# As run() configures it: the settings read from the environment by args.py.
# (One line, like DYNAMO's, so that both scripts log from the same line numbers.)
OURS = (
    "from backend_common.args import log_filter_from_env, logging_jsonl_from_env; "
    "from backend_common.runtime.log import configure_logging; "
    "configure_logging(log_filter_from_env(), jsonl=logging_jsonl_from_env())"
)
DYNAMO = "from dynamo.runtime.logging import configure_dynamo_logging; configure_dynamo_logging()"
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def run(python: str, setup: str) -> list[dict]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(RUNTIME_SRC),
        "DYN_LOGGING_JSONL": "1",
        "DYN_LOG": "info",
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    out = subprocess.run(
        [python, "-c", SCRIPT.format(setup=setup)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [json.loads(line) for line in (out.stderr + out.stdout).splitlines() if line]
    # Dynamo's own start-up lines come from its Rust code, not from a Python record.
    return [entry for entry in lines if entry.get("target") == "log"]


def test_jsonl_lines_have_dynamos_shape() -> None:
    ours = run(sys.executable, OURS)
    assert [e["level"] for e in ours] == ["INFO", "WARN", "ERROR"]
    serving, lost, failed = ours
    assert list(serving) == [
        "time",
        "level",
        "target",
        "message",
        "log.file",
        "log.line",
        "log.target",
    ]
    assert TIME.match(serving["time"])
    assert serving["message"] == "Serving m on ns.c.e"
    assert serving["log.target"] == "<string>.serve" and lost["log.target"] == "<string>"
    assert isinstance(serving["log.line"], int)
    assert failed["message"].startswith("failed\nTraceback (most recent call last):")
    assert failed["message"].endswith("ZeroDivisionError: division by zero")


def test_jsonl_lines_match_the_real_1_6_1_worker() -> None:
    python = require_frontend()
    ours, theirs = run(sys.executable, OURS), run(python, DYNAMO)
    assert len(ours) == len(theirs) == 3
    for mine, real in zip(ours, theirs, strict=True):
        assert list(mine) == list(real)
        assert TIME.match(real["time"]) and TIME.match(mine["time"])
        assert {k: v for k, v in mine.items() if k != "time"} == {
            k: v for k, v in real.items() if k != "time"
        }
