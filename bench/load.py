"""The load generator: a bounded number of streaming chat requests at a fixed concurrency.

Contract: ``run_level(base_url, model, concurrency=C, requests=N, ...)`` sends exactly ``N``
streaming ``/v1/chat/completions`` requests (``max_tokens`` output tokens each,
``stream_options.include_usage``) with at most ``C`` in flight, after ``warmup`` requests at the
same concurrency that are not counted, and returns a ``LevelResult``. Every request opens a new
HTTP connection (``force_close``): on reused connections the Dynamo frontend delays the first
tokens by ~40 ms (measured when the benchmark was built), which would swamp the TTFT being measured.

Each request is bounded by ``timeout`` seconds, so a level ends within
``ceil(N / C) * timeout`` seconds whatever the server does. A request counts as an error when
it does not end with HTTP 200, ``data: [DONE]``, no error event and exactly ``max_tokens``
completion tokens in the usage chunk (the tiny model's engines never emit EOS).

Timing (``time.perf_counter``, read once per SSE event as the client parses it): TTFT =
request sent -> first SSE event carrying text; ITL = gaps between consecutive text-carrying
events (near 0 when several arrive in one read, so a server that merges tokens into fewer
events shows it in ``events_per_request`` and ``tokens_per_event``, not in a smaller ITL);
wall time of a level = first request sent -> last request done. The SSE body is scanned for
byte markers rather than JSON-decoded per event: the client shares the CPUs with the stack it
measures, so it must stay cheap. Only the usage and error events are decoded.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = ["LevelResult", "RequestResult", "percentile", "run_level", "PROMPT"]

PROMPT = " ".join(f"w{i}" for i in range(1, 33))
"""A 32-word prompt (each word one token of the tiny model)."""

CONNECTION_MODE = "new connection per request"

_CONTENT = b'"content":"'
_USAGE = b'"usage":{'
_ERROR = b'"error"'
_DONE = b"[DONE]"


@dataclass
class RequestResult:
    """One request: ``error`` is None for a good one."""

    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    events: int = 0  # SSE events that carried text
    e2e_s: float = 0.0


@dataclass
class LevelResult:
    """One concurrency level of one target (only the counted requests)."""

    concurrency: int
    requests: int
    wall_s: float
    results: list[RequestResult]

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if not r.ok)

    def error_samples(self, limit: int = 3) -> list[str]:
        return [r.error or "" for r in self.results if not r.ok][:limit]

    def summary(self) -> dict[str, Any]:
        """The numbers the report keeps: rates, latency percentiles in ms, errors."""
        good = [r for r in self.results if r.ok]
        tokens = sum(r.completion_tokens for r in good)
        ttft = [r.ttft_s for r in good if r.ttft_s is not None]
        itl = [gap for r in good for gap in r.itl_s]
        events = sum(r.events for r in good)
        wall = self.wall_s
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": len(good),
            "errors": self.errors,
            "error_samples": self.error_samples(),
            "wall_s": round(self.wall_s, 4),
            "requests_per_s": len(good) / wall if wall > 0 else None,
            "output_tokens_per_s": tokens / wall if wall > 0 else None,
            "output_tokens": tokens,
            "ttft_ms_p50": _ms(percentile(ttft, 50)),
            "ttft_ms_p99": _ms(percentile(ttft, 99)),
            "itl_ms_p50": _ms(percentile(itl, 50)),
            "itl_ms_p99": _ms(percentile(itl, 99)),
            "e2e_ms_p50": _ms(percentile([r.e2e_s for r in good], 50)),
            "itl_samples": len(itl),
            "events_per_request": events / len(good) if good else None,
            "tokens_per_event": tokens / events if events else None,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats drifting
    return ordered[int(min(rank, len(ordered))) - 1]


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    *,
    max_tokens: int,
    timeout: float,  # noqa: ASYNC109 - one bound for connect + whole body
    extra: dict[str, Any] | None = None,
) -> RequestResult:
    """Send one streaming chat request and measure it; never raises for server behaviour.
    ``extra`` adds top-level request fields (e.g. ``nvext``)."""
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    result = RequestResult(ok=False)
    t0 = time.perf_counter()
    try:
        async with session.post(
            url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            if resp.status != 200:
                body = (await resp.text(errors="replace"))[:200]
                result.error = f"HTTP {resp.status}: {body}"
                return result
            done = await _read_events(resp.content, result, t0)
    except TimeoutError:
        result.error = f"timeout after {timeout} s"
        return result
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        result.e2e_s = time.perf_counter() - t0
    if result.error is None:
        if not done:
            result.error = "stream ended without [DONE]"
        elif result.completion_tokens != max_tokens:
            result.error = f"usage.completion_tokens {result.completion_tokens} != {max_tokens}"
    result.ok = result.error is None
    return result


async def _read_events(content: aiohttp.StreamReader, result: RequestResult, t0: float) -> bool:
    """Scan SSE events as they arrive; returns True once ``[DONE]`` was seen."""
    buf = b""
    last: float | None = None
    done = False
    clock = time.perf_counter
    async for piece in content.iter_any():
        buf += piece
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        *events, buf = buf.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data:"):
                if event.startswith(b"event:") and b"error" in event[:20]:
                    result.error = f"error event: {event[:200]!r}"
                continue
            data = event[5:].strip()
            if data == _DONE:
                done = True
                continue
            at = data.find(_CONTENT)
            if at >= 0 and data[at + len(_CONTENT) : at + len(_CONTENT) + 1] != b'"':
                now = clock()
                result.events += 1
                if last is None:
                    result.ttft_s = now - t0
                else:
                    result.itl_s.append(now - last)
                last = now
            if _USAGE in data or _ERROR in data:
                obj = json.loads(data)
                if isinstance(obj, dict):
                    if obj.get("error") is not None:
                        result.error = f"error event: {data[:200]!r}"
                    usage = obj.get("usage")
                    if isinstance(usage, dict):
                        result.completion_tokens = int(usage.get("completion_tokens") or 0)
    return done


async def _drive(
    base_url: str,
    model: str,
    *,
    concurrency: int,
    count: int,
    max_tokens: int,
    timeout: float,  # noqa: ASYNC109
    extra: dict[str, Any] | None = None,
) -> tuple[float, list[RequestResult]]:
    url = base_url.rstrip("/") + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    results: list[RequestResult] = []
    remaining = count

    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                results.append(
                    await one_request(
                        session, url, model, max_tokens=max_tokens, timeout=timeout, extra=extra
                    )
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
        wall = time.perf_counter() - t0
    return wall, results


async def run_level(
    base_url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    warmup: int,
    max_tokens: int = 64,
    timeout: float = 60.0,  # noqa: ASYNC109 - per request
    extra: dict[str, Any] | None = None,
) -> LevelResult:
    """Warm up (uncounted), then measure ``requests`` requests at ``concurrency``; ``extra``
    adds top-level fields to every request."""
    if concurrency < 1 or requests < 1 or warmup < 0:
        raise ValueError("concurrency and requests must be >= 1, warmup >= 0")
    if warmup:
        await _drive(
            base_url,
            model,
            concurrency=concurrency,
            count=warmup,
            max_tokens=max_tokens,
            timeout=timeout,
            extra=extra,
        )
    wall, results = await _drive(
        base_url,
        model,
        concurrency=concurrency,
        count=requests,
        max_tokens=max_tokens,
        timeout=timeout,
        extra=extra,
    )
    return LevelResult(concurrency=concurrency, requests=requests, wall_s=wall, results=results)
