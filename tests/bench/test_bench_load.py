"""The load generator's SSE scan: one timestamp and one count per text-carrying event."""

from __future__ import annotations

import asyncio
import json

from bench.load import LevelResult, RequestResult, _read_events


class _Content:
    """Stands in for aiohttp's StreamReader: yields the given pieces from ``iter_any``."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def iter_any(self):
        for piece in self.pieces:
            await asyncio.sleep(0.002)
            yield piece


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(content: str | None) -> bytes:
    return _event({"choices": [{"index": 0, "delta": {"content": content}}]})


async def test_events_are_counted_and_timed_one_by_one_across_reads() -> None:
    body = b"".join(_chunk(f" w{i}") for i in range(5))
    body += _chunk("") + _chunk(None)  # no text: not counted (finish/role-only events)
    body += _event({"choices": [], "usage": {"completion_tokens": 5}}) + b"data: [DONE]\n\n"
    # Split mid-event and put several events into one read.
    pieces = [body[:30], body[30:200], body[200:]]
    result = RequestResult(ok=False)
    loop = asyncio.get_running_loop()
    done = await _read_events(_Content(pieces), result, loop.time())
    assert done
    assert result.events == 5 and result.completion_tokens == 5
    assert result.ttft_s is not None and len(result.itl_s) == 4
    level = LevelResult(concurrency=1, requests=1, wall_s=1.0, results=[result])
    result.ok = True
    summary = level.summary()
    assert summary["events_per_request"] == 5 and summary["tokens_per_event"] == 1.0


async def test_merged_tokens_show_as_fewer_events() -> None:
    body = _chunk(" w1 w2 w3") + _chunk(" w4")
    body += _event({"choices": [], "usage": {"completion_tokens": 4}}) + b"data: [DONE]\n\n"
    result = RequestResult(ok=True)
    await _read_events(_Content([body]), result, 0.0)
    summary = LevelResult(concurrency=1, requests=1, wall_s=1.0, results=[result]).summary()
    assert summary["events_per_request"] == 2 and summary["tokens_per_event"] == 2.0


async def test_error_event_is_reported() -> None:
    body = _event({"error": {"message": "boom", "code": 500}}) + b"data: [DONE]\n\n"
    result = RequestResult(ok=False)
    await _read_events(_Content([body]), result, 0.0)
    assert result.error is not None and "boom" in result.error
