"""An engine shaped like a real foreign one (vLLM, SGLang), run as a worker process by tests.

* Its own parser defines vLLM's and SGLang's flag names (``--model-path``/``--model``,
  ``--served-model-name``, ``--tool-call-parser``, ``--reasoning-parser``, ``--host``,
  ``--port``), some before and some after ``add_common_args``; the worker must read them.
* It records into the global ``prometheus_client.REGISTRY`` (as vLLM and SGLang do):
  ``foreign_engine_generate_total``.
* Fault injection by prompt token: token ``ERROR_BASE + i`` raises ``CATEGORIES[i]`` after
  ``--fail-after`` tokens (0: before the first item), only when that token ends the prompt,
  so a migrated retry (the prompt then ends with the tokens already generated) succeeds.
* ``--cleanup-hangs``: ``cleanup()`` never returns. ``--start-delay S``: ``start()`` takes S
  seconds. ``--grab-signals``: ``start()`` installs its own SIGTERM/SIGINT loop handlers.

Every observable step is a line ``EVENT <kind> <detail>`` on stderr (the worker's log).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

from prometheus_client import Counter

from backend_common import EngineConfig, GenerateContext, LLMEngineOutput, PreprocessedRequest
from backend_common.args import add_common_args, worker_config_from_args
from backend_common.errors import BackendError, DynamoError
from backend_common.reference import ReferenceEngine

ERROR_BASE = 960
CATEGORIES = list(BackendError)

GENERATED = Counter("foreign_engine_generate", "generate() calls of the foreign test engine.")


def event(kind: str, detail: str) -> None:
    print(f"EVENT {kind} {detail}", file=sys.stderr, flush=True)


class ForeignEngine(ReferenceEngine):
    fail_after = 2
    cleanup_hangs = False
    start_delay = 0.0
    grab_signals = False

    @classmethod
    def from_args(cls, argv=None):
        parser = argparse.ArgumentParser()
        # SGLang's spellings first, then Dynamo's, then vLLM's: both orders are exercised.
        parser.add_argument("--model-path", "--model", dest="model_path", default=None)
        parser.add_argument("--tool-call-parser", default=None)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=30000)
        add_common_args(parser)
        parser.add_argument("--served-model-name", nargs="+", default=None)
        parser.add_argument("--reasoning-parser", default="")
        parser.add_argument("--fail-after", type=int, default=2)
        parser.add_argument("--cleanup-hangs", action="store_true")
        parser.add_argument("--start-delay", type=float, default=0.0)
        parser.add_argument("--grab-signals", action="store_true")
        args = parser.parse_args(argv)
        config = worker_config_from_args(args)
        event(
            "config",
            f"model_path={config.model_path} served={config.served_model_name} "
            f"tool_call_parser={config.tool_call_parser} "
            f"reasoning_parser={config.reasoning_parser} engine_port={args.port}",
        )
        engine = cls(config.public_name or "foreign-model", max_tokens=8)
        engine.fail_after = args.fail_after
        engine.cleanup_hangs = args.cleanup_hangs
        engine.start_delay = args.start_delay
        engine.grab_signals = args.grab_signals
        return engine, config

    async def start(self, worker_id: int) -> EngineConfig:
        event("start", str(worker_id))
        if self.grab_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, lambda: event("engine-signal-handler", "ran"))
        if self.start_delay:
            await asyncio.sleep(self.start_delay)
        event("started", str(worker_id))
        return await super().start(worker_id)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        GENERATED.inc()
        last = request.token_ids[-1] if request.token_ids else -1
        index = last - ERROR_BASE
        category = CATEGORIES[index] if 0 <= index < len(CATEGORIES) else None
        count = 0
        async for item in super().generate(request, ctx):
            if category is not None and count == self.fail_after:
                event("raise", category.value)
                raise DynamoError(f"injected {category.value}", category)
            yield item
            count += 1

    async def cleanup(self) -> None:
        event("cleanup", "begin")
        if self.cleanup_hangs:
            await asyncio.Event().wait()
        await super().cleanup()
        event("cleanup", "done")


if __name__ == "__main__":
    from backend_common import run

    run(ForeignEngine)
