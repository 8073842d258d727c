"""What the vLLM pair (e)/(f) is checked for besides speed: greedy parity, SIGTERM, engine death.

Used by ``bench.vllm_pair``, once per target, through the bench's one real frontend:

* ``greedy_token_ids(base_url, model, prompts, max_tokens)``: one non-streaming
  ``/v1/completions`` request per token-id prompt, one at a time (c=1), temperature 0,
  ``ignore_eos``; the served token ids are read from the response's
  ``nvext.completion_token_ids`` (asked for with ``"nvext": {"extra_fields":
  ["completion_token_ids"]}``). ``parity(served, offline)`` compares them with vLLM's
  offline ``LLM.generate`` (``bench.vllm_offline``).
* ``signal_probe(...)``: ``streams`` streaming chat requests in flight (``ignore_eos``, long
  enough to still be running), then one signal: SIGTERM to the worker, or SIGKILL to its
  engine-core child process. It records how each stream ended (``StreamOutcome``), how long
  the worker took to exit and with which code, and whether the frontend stopped listing the
  model before the worker exited (a worker that leaves discovery first is never sent a
  request it cannot serve). Everything is bounded: each stream by ``stream_timeout``, the
  wait for the exit by ``exit_timeout`` (then the worker is killed and the probe says so).

How a stream ended, as a client sees it (``classify``): ``finished`` when a chunk carried a
``finish_reason``; ``error`` when the response was not HTTP 200 or the stream carried an
error event (a typed error the client can act on); ``cut`` otherwise (the stream or the
connection ended without either).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

__all__ = [
    "SignalProbe",
    "StreamOutcome",
    "classify",
    "engine_core_pids",
    "greedy_token_ids",
    "parity",
    "parse_sse",
    "signal_probe",
    "tally",
]

ENGINE_CORE_NAMES = ("EngineCore", "VLLM::EngineCor")
"""How vLLM's engine-core process shows in ``/proc/<pid>/comm`` / ``cmdline`` (comm is
truncated to 15 characters)."""


# -- parity ------------------------------------------------------------------------------
def completion_token_ids(body: dict[str, Any]) -> list[int] | None:
    """The served ids of a non-streaming completion (``nvext.completion_token_ids``; the
    1.6.1 frontend puts them on the response or on its first choice)."""
    for holder in (body, *(body.get("choices") or [])):
        if not isinstance(holder, dict):
            continue
        nvext = holder.get("nvext")
        if isinstance(nvext, dict) and isinstance(nvext.get("completion_token_ids"), list):
            return [int(t) for t in nvext["completion_token_ids"]]
    return None


async def greedy_token_ids(
    base_url: str,
    model: str,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    timeout: float = 60.0,  # noqa: ASYNC109 - per request
) -> list[list[int] | str]:
    """Per prompt the served token ids, or an error string; requests one at a time."""
    url = base_url.rstrip("/") + "/v1/completions"
    out: list[list[int] | str] = []
    async with aiohttp.ClientSession() as session:
        for prompt in prompts:
            payload = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": False,
                "ignore_eos": True,  # top level: the 1.6.1 frontend refuses it in nvext
                "nvext": {"extra_fields": ["completion_token_ids"]},
            }
            try:
                async with session.post(
                    url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)
                ) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        out.append(f"HTTP {resp.status}: {text[:200]}")
                        continue
                    ids = completion_token_ids(json.loads(text))
                    out.append(ids if ids is not None else f"no completion_token_ids: {text[:200]}")
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                out.append(f"{type(exc).__name__}: {exc}")
    return out


def parity(served: list[list[int] | str], offline: list[list[int]]) -> dict[str, Any]:
    """``{"equal": k, "prompts": n, "mismatches": [...]}`` (a served error counts unequal)."""
    mismatches = []
    for i, (got, want) in enumerate(zip(served, offline, strict=True)):
        if got != want:
            mismatches.append({"prompt": i, "served": got, "offline": want})
    return {
        "equal": len(served) - len(mismatches),
        "prompts": len(served),
        "mismatches": mismatches,
    }


# -- streams -----------------------------------------------------------------------------
@dataclass
class StreamOutcome:
    """How one stream ended: ``kind`` is finished / error / cut (see the module docstring)."""

    kind: str
    finish_reason: str | None = None
    detail: str | None = None
    tokens: int = 0  # SSE chunks with text
    ended_at: float = 0.0  # time.monotonic() when the stream ended


@dataclass
class SseSummary:
    """What ``parse_sse`` found in a stream body."""

    finish_reason: str | None = None
    error: str | None = None
    done: bool = False
    text_chunks: int = 0
    events: list[str] = field(default_factory=list)


def parse_sse(body: bytes) -> SseSummary:
    """Scan a (possibly truncated) SSE body of a streaming chat or completion."""
    out = SseSummary()
    for raw in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        event_name = None
        data = None
        for line in raw.split(b"\n"):
            if line.startswith(b"event:"):
                event_name = line[6:].strip().decode("utf-8", "replace")
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        if event_name is not None:
            out.events.append(event_name)
        if event_name == "error":
            out.error = (data or b"").decode("utf-8", "replace")[:300] or "error event"
            continue
        if data is None:
            continue
        if data == b"[DONE]":
            out.done = True
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if obj.get("error") is not None:
            out.error = json.dumps(obj["error"])[:300]
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            if (isinstance(delta, dict) and delta.get("content")) or choice.get("text"):
                out.text_chunks += 1
            if choice.get("finish_reason"):
                out.finish_reason = str(choice["finish_reason"])
    return out


def classify(status: int | None, body: bytes, transport_error: str | None) -> StreamOutcome:
    """The outcome of one stream from its HTTP status, the bytes received and the exception
    (if any) that ended the read."""
    if status is not None and status != 200:
        return StreamOutcome("error", detail=f"HTTP {status}: {body[:200]!r}")
    if status is None:
        return StreamOutcome("cut", detail=transport_error or "no response")
    sse = parse_sse(body)
    if sse.error is not None:
        return StreamOutcome("error", detail=sse.error, tokens=sse.text_chunks)
    if sse.finish_reason is not None:
        return StreamOutcome("finished", finish_reason=sse.finish_reason, tokens=sse.text_chunks)
    detail = transport_error or ("ended after [DONE]" if sse.done else "ended without [DONE]")
    return StreamOutcome("cut", detail=f"no finish_reason: {detail}", tokens=sse.text_chunks)


def tally(outcomes: list[StreamOutcome]) -> dict[str, Any]:
    """Counts per kind and per finish reason, and a few details of the non-finished."""
    counts = {"finished": 0, "error": 0, "cut": 0}
    reasons: dict[str, int] = {}
    for o in outcomes:
        counts[o.kind] = counts.get(o.kind, 0) + 1
        if o.finish_reason:
            reasons[o.finish_reason] = reasons.get(o.finish_reason, 0) + 1
    samples = sorted({o.detail or "" for o in outcomes if o.kind != "finished"})[:3]
    return {**counts, "streams": len(outcomes), "finish_reasons": reasons, "samples": samples}


async def _stream(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    max_tokens: int,
    timeout: float,  # noqa: ASYNC109
    first_token: asyncio.Event | None,
) -> StreamOutcome:
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    status: int | None = None
    body = b""
    err: str | None = None
    try:
        async with session.post(
            url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            status = resp.status
            async for piece in resp.content.iter_any():
                body += piece
                if first_token is not None and b'"content":"' in body:
                    first_token.set()
                    first_token = None
    except TimeoutError:
        err = f"client timeout after {timeout} s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        err = f"{type(exc).__name__}: {exc}"
    outcome = classify(status, body, err)
    outcome.ended_at = time.monotonic()
    return outcome


def engine_core_pids(pid: int, descendants: Callable[[int], list[int]]) -> list[int]:
    """The processes below ``pid`` that are vLLM engine cores (by comm or command line)."""
    out = []
    for p in descendants(pid):
        if p == pid:
            continue
        try:
            comm = Path(f"/proc/{p}/comm").read_text(errors="replace").strip()
            cmd = (
                Path(f"/proc/{p}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            continue
        if any(name in comm or name in cmd for name in ENGINE_CORE_NAMES):
            out.append(p)
    return out


def shm_names() -> set[str]:
    """Names under /dev/shm (vLLM's shared-memory segments live there)."""
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


@dataclass
class SignalProbe:
    """The result of one ``signal_probe`` (JSON-ready through ``to_dict``)."""

    signal: str
    signalled: str  # "worker" or "engine core <pid>"
    streams: dict[str, Any]
    exit_s: float | None  # signal -> worker exit; None: did not exit within the bound
    exit_code: int | None
    out_of_discovery_s: float | None  # signal -> the frontend stops listing the model
    out_of_discovery_before_exit: bool | None
    last_stream_end_s: float | None  # signal -> the last stream ended
    leaked_shm: list[str]
    exit_timeout_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def signal_probe(
    *,
    base_url: str,
    model: str,
    worker_pid: int,
    wait_exit: Callable[[float], int | None],
    listed: Callable[[], bool],
    descendants: Callable[[int], list[int]],
    target: str,
    streams: int,
    max_tokens: int,
    after_first_tokens: int,
    shm_before: set[str],
    stream_timeout: float = 120.0,  # noqa: ASYNC109
    exit_timeout: float = 60.0,
) -> SignalProbe:
    """Put ``streams`` streams in flight, signal ``target`` ("worker": SIGTERM to the worker;
    "engine-core": SIGKILL to its engine core) once ``after_first_tokens`` streams have a
    token, then follow streams, discovery and the exit (see the module docstring).

    ``wait_exit(timeout)`` blocks until the worker exits and returns its code (None on
    timeout); ``listed()`` says whether the frontend still lists ``model``.
    """
    url = base_url.rstrip("/") + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector) as session:
        firsts = [asyncio.Event() for _ in range(streams)]
        tasks = [
            asyncio.create_task(_stream(session, url, model, max_tokens, stream_timeout, ev))
            for ev in firsts
        ]
        deadline = time.monotonic() + stream_timeout
        # Polled: three conditions (enough first tokens, the deadline, all streams done).
        while (  # noqa: ASYNC110
            sum(ev.is_set() for ev in firsts) < after_first_tokens
            and time.monotonic() < deadline
            and not all(t.done() for t in tasks)
        ):
            await asyncio.sleep(0.02)
        if target == "worker":
            sig, victim, signalled = signal.SIGTERM, worker_pid, "worker"
        else:
            cores = engine_core_pids(worker_pid, descendants)
            if not cores:
                raise RuntimeError(f"no engine-core process below worker {worker_pid}")
            sig, victim, signalled = signal.SIGKILL, cores[0], f"engine core {cores[0]}"
        t0 = time.monotonic()
        os.kill(victim, sig)

        gone_at: list[float] = []

        async def watch_discovery() -> None:
            while time.monotonic() - t0 < exit_timeout + 15:
                if not await loop.run_in_executor(None, listed):
                    gone_at.append(time.monotonic())
                    return
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch_discovery())
        code = await loop.run_in_executor(None, wait_exit, exit_timeout)
        exit_at = time.monotonic() if code is not None else None
        outcomes = await asyncio.gather(*tasks)
        # Discovery is followed a little past the exit: a worker that did not withdraw
        # itself disappears only when its lease expires.
        try:
            await asyncio.wait_for(watcher, exit_timeout + 15)
        except TimeoutError:
            pass
    ends = [o.ended_at for o in outcomes if o.ended_at]
    gone = gone_at[0] if gone_at else None
    return SignalProbe(
        signal=sig.name,
        signalled=signalled,
        streams=tally(list(outcomes)),
        exit_s=None if exit_at is None else round(exit_at - t0, 2),
        exit_code=code,
        out_of_discovery_s=None if gone is None else round(gone - t0, 2),
        out_of_discovery_before_exit=(None if gone is None or exit_at is None else gone < exit_at),
        last_stream_end_s=round(max(ends) - t0, 2) if ends else None,
        leaked_shm=sorted(shm_names() - shm_before),
        exit_timeout_s=exit_timeout,
    )
