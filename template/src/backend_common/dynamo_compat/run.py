"""``run(EngineCls)`` for 1.6.1-style engines (``dynamo.common.backend.run``).

``run(engine_cls, argv=None, engine_factory=None)``: ``engine_factory(argv)``, else
``engine_cls.from_args(argv)``, gives ``(engine, WorkerConfig)``; the engine is wrapped in
``DynamoEngineAdapter`` and served by ``backend_common``'s ``run`` (logging, uvloop, the
process exit codes of docs/architecture.md). A ``WorkerConfig`` field with no equivalent here
fails there as a bad argument (exit 2) naming the field.

``_start(engine_cls, argv, engine_factory)`` is 1.6.1's coroutine of the same name: build,
then ``Worker(engine, config).run()`` on the running loop; it returns the exit code.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from .engine import BaseEngine
from .worker import Worker, WorkerConfig

__all__ = ["EngineFactory", "Worker", "run"]

EngineFactory = Callable[[list[str] | None], Awaitable[tuple[BaseEngine, WorkerConfig]]]


async def _build(
    engine_cls: type[BaseEngine], argv: list[str] | None, engine_factory: EngineFactory | None
) -> tuple[BaseEngine, WorkerConfig]:
    built: Any = (engine_factory or engine_cls.from_args)(argv)
    if inspect.isawaitable(built):
        built = await built
    engine, config = built
    return engine, config


async def _start(
    engine_cls: type[BaseEngine],
    argv: list[str] | None = None,
    engine_factory: EngineFactory | None = None,
) -> int:
    engine, config = await _build(engine_cls, argv, engine_factory)
    return await Worker(engine, config).run()


def run(
    engine_cls: type[BaseEngine],
    argv: list[str] | None = None,
    engine_factory: EngineFactory | None = None,
) -> NoReturn:
    from ..runtime.runner import run as run_worker
    from .adapter import DynamoEngineAdapter, adapt

    async def build(argv: list[str] | None) -> Any:
        engine, config = await _build(engine_cls, argv, engine_factory)
        return adapt(engine, config)

    run_worker(DynamoEngineAdapter, argv, engine_factory=build)
