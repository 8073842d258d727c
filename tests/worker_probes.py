"""What tests read off a running worker: its /metrics, its EVENT log lines, a prompt of words."""

from __future__ import annotations

import re
import urllib.request


def words(n: int) -> str:
    return "".join(f" w{i}" for i in range(1, n + 1))


def scrape(port: int) -> dict[str, float]:
    """Unlabelled view of a worker's /metrics: metric name -> summed value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{", 1)[0]
        values[base] = values.get(base, 0.0) + float(value)
    return values


def events(proc, kind: str) -> list[str]:
    text = proc.log_path.read_text(errors="replace")
    return re.findall(rf"^EVENT {kind} (\S+)$", text, flags=re.MULTILINE)
