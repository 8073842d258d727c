"""``run(EngineCls)``: the entry point a backend's ``__main__`` hands its engine to.

    from backend_common import run
    from .engine import MyEngine

    run(MyEngine)

Order: logging from ``DYN_LOG`` -> ``EngineCls.from_args(argv)`` (sync or
async; or ``engine_factory``) -> logging again if ``config.log_filter`` or
``config.logging_jsonl`` differ -> ``Worker(engine, config).run()`` on uvloop when
installed -> ``sys.exit`` with the worker's exit code (0 after a graceful shutdown, 1
when start-up failed, 2 for bad arguments, 124 when shutdown passed its overall
deadline). Errors are printed as
typed errors on stderr. This is the only module that imports the worker.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from ..args import log_filter_from_env, logging_jsonl_from_env
from ..config import WorkerConfig
from ..engine import LLMEngine
from ..errors import from_exception
from .log import configure_logging
from .worker import Worker

__all__ = ["run", "serve"]

log = logging.getLogger(__name__)

EngineFactory = Callable[
    [list[str] | None],
    tuple[LLMEngine, WorkerConfig] | Awaitable[tuple[LLMEngine, WorkerConfig]],
]


async def serve(engine: LLMEngine, config: WorkerConfig) -> int:
    """Serve an already-built engine on the running loop; return the worker's exit code.

    For callers that build the engine themselves (``dynamo_compat``'s ``Worker.run``).
    """
    return await Worker(engine, config).run()


async def _main(
    engine_cls: type[LLMEngine], argv: list[str] | None, factory: EngineFactory | None
) -> int:
    build = factory or engine_cls.from_args
    try:
        built: Any = build(argv)
        if inspect.isawaitable(built):
            built = await built
        engine, config = built
    except SystemExit as exc:  # argparse --help / usage errors
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    except Exception as exc:  # noqa: BLE001
        err = from_exception(exc)
        print(f"error: from_args failed: {err}", file=sys.stderr)
        return 2
    if (config.log_filter, config.logging_jsonl) != (
        log_filter_from_env(),
        logging_jsonl_from_env(),
    ):
        configure_logging(config.log_filter, jsonl=config.logging_jsonl)
    # What exists now (modules, classes, the engine object) lives as long as the process:
    # freezing it takes it out of the collector's generations, so the full collections that
    # the long-lived objects of many open streams trigger no longer rescan all of it.
    gc.freeze()
    return await serve(engine, config)


def _asyncio_run(coro: Awaitable[int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def run(
    engine_cls: type[LLMEngine],
    argv: list[str] | None = None,
    *,
    engine_factory: EngineFactory | None = None,
) -> NoReturn:
    configure_logging(log_filter_from_env(), jsonl=logging_jsonl_from_env())
    code = _asyncio_run(_main(engine_cls, argv, engine_factory))
    sys.exit(code)
