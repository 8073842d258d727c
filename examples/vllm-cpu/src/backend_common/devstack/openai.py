"""A tiny OpenAI-compatible HTTP client (aiohttp) for tests and benchmarks.

Contract: ``chat`` and ``completion`` send ONE request to ``/v1/chat/completions`` or
``/v1/completions`` of a frontend at ``base_url`` and return a ``ChatResult``; they never
retry. Every call is bounded by ``timeout`` seconds in total (connect + all of the body);
when it runs out, ``TimeoutError`` is raised. Connection failures propagate as
``aiohttp.ClientError``. HTTP errors do not raise: they come back as ``status`` + ``error``.

Streaming responses are parsed by ``iter_sse`` (``text/event-stream``): ``data:`` lines,
multi-line events, comments, ``[DONE]`` and error events (``data: {"error": {...}}``, which
the Dynamo frontend sends with HTTP status 200 when a stream fails midway) are tolerated.

Timing (for the benchmark): ``ttft_s`` = request sent -> first event carrying text;
``itl`` = gaps between consecutive text-carrying events; ``e2e_s`` = request sent -> end of
body. Measured with ``time.perf_counter`` at the moment each event is parsed.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

DEFAULT_TIMEOUT_S = 60.0
MAX_SSE_BUFFER = 16 * 1024 * 1024
"""Bytes of one unterminated SSE line the parser holds before giving up (ValueError)."""


@dataclass
class SseEvent:
    """One server-sent event: its ``event:`` name (``"message"`` if absent) and joined data."""

    event: str
    data: str


@dataclass
class ChatResult:
    """The outcome of one chat or completion request.

    ``text`` is the concatenation of all content pieces of choice 0 (streaming) or its full
    text (non-streaming). ``error`` is the error object: the ``"error"`` member of an SSE
    error event or of a JSON error body, or the JSON error body itself when it has no such
    member (Dynamo's ``{"message":..,"type":..,"code":..}``), or ``{"message": <body>}`` for
    a non-JSON body. ``chunks`` counts the JSON SSE events received ([DONE] excluded; 0 when
    not streaming). ``done`` is true once ``data: [DONE]`` was seen.
    """

    status: int
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    chunks: int = 0
    done: bool = False
    model: str | None = None
    ttft_s: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    body: dict[str, Any] | None = None
    """The parsed JSON body of a non-streaming response (or of an error response)."""

    @property
    def ok(self) -> bool:
        """HTTP 200 and no error event."""
        return self.status == 200 and self.error is None


async def iter_sse(content: aiohttp.StreamReader) -> AsyncIterator[SseEvent]:
    """Yield the events of a ``text/event-stream`` body until EOF.

    Lines end in LF, CRLF or CR; ``:`` starts a comment; an event ends at an empty line
    (a trailing event without one is still yielded at EOF). Fields other than ``data``
    and ``event`` are ignored. A line longer than ``MAX_SSE_BUFFER`` raises ``ValueError``.
    """
    buf = b""
    data: list[str] = []
    name = "message"
    # Read whatever arrives instead of readline(): aiohttp's readline has a line-length limit
    # and several events often arrive in one TCP segment.
    async for piece in content.iter_any():
        buf += piece
        if len(buf) > MAX_SSE_BUFFER:
            raise ValueError(f"SSE line longer than {MAX_SSE_BUFFER} bytes")
        *lines, buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            if line == "":
                if data:
                    yield SseEvent(name, "\n".join(data))
                data, name = [], "message"
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "data":
                data.append(value)
            elif key == "event":
                name = value
    if buf.strip():
        line = buf.decode("utf-8", errors="replace")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield SseEvent(name, "\n".join(data))


def _error_object(body: Any, raw: str) -> dict[str, Any]:
    if isinstance(body, dict):
        inner = body.get("error")
        return inner if isinstance(inner, dict) else body
    return {"message": raw}


def _piece(choice: dict[str, Any], chat: bool) -> str:
    if chat:
        delta = choice.get("delta") or choice.get("message") or {}
        value = delta.get("content") if isinstance(delta, dict) else None
    else:
        value = choice.get("text")
    return value if isinstance(value, str) else ""


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    *,
    chat: bool,
    stream: bool,
    timeout: float,  # noqa: ASYNC109 - passed to aiohttp.ClientTimeout(total=)
) -> ChatResult:
    t0 = time.perf_counter()
    try:
        async with session.post(
            url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            result = ChatResult(status=resp.status)
            is_sse = resp.content_type == "text/event-stream"
            if stream and resp.status == 200 and is_sse:
                await _read_stream(resp, result, chat=chat, t0=t0)
            else:
                raw = await resp.text(errors="replace")
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                result.body = body if isinstance(body, dict) else None
                if resp.status != 200:
                    result.error = _error_object(body, raw)
                elif result.body is None:
                    result.error = {"message": f"response is not a JSON object: {raw[:200]!r}"}
                else:
                    _read_body(result.body, result, chat=chat)
                    if result.text:
                        result.ttft_s = time.perf_counter() - t0
    except TimeoutError as exc:
        raise TimeoutError(f"POST {url} did not finish within {timeout} s") from exc
    result.e2e_s = time.perf_counter() - t0
    return result


def _read_body(body: dict[str, Any], result: ChatResult, *, chat: bool) -> None:
    result.model = body.get("model")
    result.usage = body.get("usage")
    choices = body.get("choices") or []
    if choices and isinstance(choices[0], dict):
        result.text = _piece(choices[0], chat)
        result.finish_reason = choices[0].get("finish_reason")
    if isinstance(body.get("error"), dict):
        result.error = body["error"]


async def _read_stream(
    resp: aiohttp.ClientResponse, result: ChatResult, *, chat: bool, t0: float
) -> None:
    parts: list[str] = []
    last: float | None = None
    async for ev in iter_sse(resp.content):
        if ev.data.strip() == "[DONE]":
            result.done = True
            continue
        try:
            obj = json.loads(ev.data)
        except ValueError:
            result.error = result.error or {"message": f"invalid SSE data: {ev.data[:200]!r}"}
            continue
        if not isinstance(obj, dict):
            continue
        result.chunks += 1
        if ev.event == "error" or "error" in obj:
            result.error = _error_object(obj, ev.data)
            continue
        result.model = obj.get("model", result.model)
        if obj.get("usage"):
            result.usage = obj["usage"]
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            piece = _piece(choice, chat)
            if piece:
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - t0
                else:
                    result.itl.append(now - last)
                last = now
                parts.append(piece)
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
    result.text = "".join(parts)


async def chat(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    content: str,
    *,
    max_tokens: int | None,
    stream: bool,
    include_usage: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,  # noqa: ASYNC109 - one bound for the whole call
    extra: dict[str, Any] | None = None,
) -> ChatResult:
    """POST one user message to ``{base_url}/v1/chat/completions``.

    ``max_tokens=None`` leaves it out of the request. ``include_usage`` sets
    ``stream_options.include_usage`` when streaming. ``extra`` is merged into the JSON body
    last (it may replace ``messages`` or add sampling options).
    """
    payload: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    }
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    if stream and include_usage:
        payload["stream_options"] = {"include_usage": True}
    payload.update(extra or {})
    url = base_url.rstrip("/") + "/v1/chat/completions"
    return await _post(session, url, payload, chat=True, stream=stream, timeout=timeout)


async def completion(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    prompt: str,
    *,
    max_tokens: int | None,
    stream: bool,
    include_usage: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,  # noqa: ASYNC109 - one bound for the whole call
    extra: dict[str, Any] | None = None,
) -> ChatResult:
    """POST one prompt to ``{base_url}/v1/completions``; otherwise as ``chat``."""
    payload: dict[str, Any] = {"model": model, "prompt": prompt, "stream": stream}
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    if stream and include_usage:
        payload["stream_options"] = {"include_usage": True}
    payload.update(extra or {})
    url = base_url.rstrip("/") + "/v1/completions"
    return await _post(session, url, payload, chat=False, stream=stream, timeout=timeout)
