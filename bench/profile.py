"""Summaries of py-spy profiles (``python -m bench --profile DIR`` writes collapsed stacks).

``summarize(path)`` reads one ``<key>.txt`` (py-spy ``--format raw``: ``frame;frame;... count``
per line), keeps the samples of the worker's event-loop thread (stacks rooted in the main
module; py-spy also samples idle helper threads, which would dilute the shares) and returns the
share of those samples, in percent, spent in each of ``GROUPS``: the first group whose marker
occurs in a stack claims the sample, the rest count as ``other``. The groups name the hot-path
costs docs/benchmark.md discusses, so before/after profiles compare group by group.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["GROUPS", "summarize"]

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("socket writes of response frames", ("CallHome._flush", "StreamWriter.write ")),
    ("call-home connect and close", ("CallHome.connect", "CallHome.close", "CallHome.finish")),
    ("request decode (frame, JSON, pydantic)", ("_read_loop", "PreprocessedRequest.from_dict")),
    ("per-item encoding", ("item_frame", "to_dict", "send_item", "send_token_ids")),
    ("engine generate (incl. per-token objects)", (".generate (",)),
    ("adapter per-item loop", ("EngineAdapter._stream",)),
    ("other request handling", ("EngineAdapter.handle",)),
)


def summarize(path: Path) -> dict[str, object]:
    counts = {name: 0 for name, _ in GROUPS}
    other = 0
    total = 0
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        if not stack.startswith("_run_module_as_main"):
            continue  # helper threads (executor, NATS): idle as far as py-spy can tell
        samples = int(n)
        total += samples
        for name, markers in GROUPS:
            if any(m in stack for m in markers):
                counts[name] += samples
                break
        else:
            other += samples
    shares = {k: round(100.0 * v / total, 1) if total else None for k, v in counts.items()}
    shares["event loop and everything else"] = round(100.0 * other / total, 1) if total else None
    return {"samples": total, "shares_percent": shares}


if __name__ == "__main__":
    import json

    print(json.dumps({p: summarize(Path(p)) for p in sys.argv[1:]}, indent=2))
