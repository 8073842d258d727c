"""``python -m bench.worker_cpu``: the runtime's own CPU per streamed token, without the frontend.

A steadier figure than throughput on a shared machine: the process's CPU time (not wall time)
while the real ``EngineAdapter`` serves ``--requests`` requests of ``--max-tokens`` tokens at
``--concurrency`` with the reference engine (one ``sleep(0)`` per token), each with its own
call-home connection to a sink in a separate process that reads and discards the frames
(as the frontend would, minus its work). Request frames are built here, so the request plane's
socket is not part of it; everything from decoding the frame body to the socket write is.

``--src DIR`` measures the ``backend_common`` under DIR instead of this checkout's (to compare
before and after a change; it must have this checkout's layout: ``runtime/``, ``transport/``).
Prints and (``--out``) writes JSON: microseconds of CPU per token for each of ``--repeat`` runs
and their median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SINK = r"""
import asyncio, sys
SENTINEL = bytes.fromhex(sys.argv[1])
async def main():
    async def on_conn(reader, writer):
        tail = b""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            tail = (tail + data)[-64:]
            if tail.endswith(SENTINEL):
                break
        writer.close()
    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def _measure(port: int, requests: int, concurrency: int, max_tokens: int) -> float:
    from backend_common.reference import ReferenceEngine
    from backend_common.runtime.adapter import EngineAdapter
    from backend_common.transport.codec import MAX_MESSAGE_LEN, ControlMessage, encode_two_part
    from backend_common.transport.plane import decode_incoming

    path = "1/dynamo/backend/generate"
    engine = ReferenceEngine()
    adapter = EngineAdapter(engine, engine_config=await engine.start(0))
    body = json.dumps(
        {"token_ids": list(range(32)), "stop_conditions": {"max_tokens": max_tokens}}
    ).encode()
    remaining = 0

    async def client(k: int) -> None:
        nonlocal remaining
        n = 0
        while remaining > 0:
            remaining -= 1
            n += 1
            control = ControlMessage(
                id=f"r{k}-{n}", address=f"127.0.0.1:{port}", subject=f"s{k}-{n}"
            )
            frame = encode_two_part(control.to_json(), body)
            incoming = decode_incoming(path, {}, frame, max_body=MAX_MESSAGE_LEN)
            assert incoming is not None
            await adapter.handle(incoming)

    remaining = 2 * concurrency
    await asyncio.gather(*(client(k) for k in range(concurrency)))  # warm-up, not counted
    remaining = requests
    t0 = time.process_time()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return (time.process_time() - t0) / (requests * max_tokens) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.worker_cpu", description=__doc__.split("\n")[0]
    )
    p.add_argument("--src", type=Path, help="directory holding the backend_common to measure")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.src is not None:
        sys.path.insert(0, str(args.src.absolute()))
    from backend_common.transport.codec import sentinel_frame

    sink = subprocess.Popen(
        [sys.executable, "-c", SINK, sentinel_frame().hex()], stdout=subprocess.PIPE, text=True
    )
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        import uvloop

        runs = [
            uvloop.run(_measure(port, args.requests, args.concurrency, args.max_tokens))
            for _ in range(args.repeat)
        ]
    finally:
        sink.terminate()
        sink.wait(timeout=10)
    import backend_common

    result = {
        "runtime": str(Path(backend_common.__file__).parent),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "cpu_us_per_token": [round(r, 2) for r in runs],
        "median_cpu_us_per_token": round(statistics.median(runs), 2),
        "loadavg": list(os.getloadavg()),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
