"""The reference engine with its KV events on a ZMQ socket, as a vLLM-based engine has them.

``--kv-events-endpoint tcp://127.0.0.1:PORT`` makes ``kv_event_sources()`` return a
``ZmqSource`` for it (rank 0); the test that starts the worker plays the engine's side and
publishes vLLM-format batches there. Without the flag the engine publishes no KV events.

    python -m tests.zmq_kv_engine --model-path DIR --model-name NAME --kv-events-endpoint URL
"""

from __future__ import annotations

import argparse

from backend_common.args import add_common_args, worker_config_from_args
from backend_common.config import WorkerConfig
from backend_common.kv_events import ZmqSource
from backend_common.reference import ReferenceEngine


class ZmqKvEngine(ReferenceEngine):
    kv_events_endpoint: str | None = None

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> tuple[ZmqKvEngine, WorkerConfig]:
        parser = argparse.ArgumentParser(description="reference engine with ZMQ KV events")
        add_common_args(parser)
        parser.add_argument("--delay", type=float, default=0.0)
        parser.add_argument("--max-tokens", type=int, default=16)
        parser.add_argument("--kv-events-endpoint", default=None)
        args = parser.parse_args(argv)
        config = worker_config_from_args(args)
        engine = cls(config.public_name, delay=args.delay, max_tokens=args.max_tokens)
        engine.kv_events_endpoint = args.kv_events_endpoint
        return engine, config

    async def kv_event_sources(self) -> list[ZmqSource]:
        if not self.kv_events_endpoint:
            return []
        return [ZmqSource(self.kv_events_endpoint, topic="", dp_rank=0)]


if __name__ == "__main__":
    from backend_common import run

    run(ZmqKvEngine)
