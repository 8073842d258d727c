"""Entry points for 1.6.1-style engines: ``run(EngineCls)`` and the command line.

``run(engine_cls, argv=None, engine_factory=None)`` (1.6.1's ``dynamo.common.backend.run.run``):
``engine_factory(argv)``, else ``engine_cls.from_args(argv)``, gives ``(engine, WorkerConfig)``;
the engine is wrapped in ``DynamoEngineAdapter`` and served by ``backend_common``'s ``run``
(logging, uvloop, the process exit codes of docs/architecture.md). A ``WorkerConfig`` field
with no equivalent here fails there as a bad argument (exit 2) naming the field.
``_start(engine_cls, argv, engine_factory)`` is 1.6.1's coroutine of the same name: build,
then ``Worker(engine, config).run()`` on the running loop; it returns the exit code.

The command line runs an engine class whose source still imports ``dynamo.*``, unmodified::

    python -m backend_common.dynamo_compat.launch [--source-dir DIR]... MODULE:CLASS [ARGS]

It installs the module aliases (``aliases.install``; ``--source-dir`` for modules the engine
keeps under ``dynamo.common.backend``), imports ``MODULE`` and calls ``run(CLASS)`` with the
remaining arguments as the engine's argv. An engine that imports
``backend_common.dynamo_compat`` instead calls ``run`` itself and needs none of this.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from . import aliases
from .engine import BaseEngine
from .worker import WorkerConfig

__all__ = ["EngineFactory", "Worker", "main", "run"]

EngineFactory = Callable[[list[str] | None], Awaitable[tuple[BaseEngine, WorkerConfig]]]


class Worker:
    """1.6.1's ``Worker(engine, config)``: ``await run()`` serves the engine on the running loop.

    The engine is wrapped in ``DynamoEngineAdapter`` and ``config`` mapped with ``to_native``;
    ``run`` returns the worker's exit code (docs/architecture.md).
    """

    def __init__(self, engine: BaseEngine, config: WorkerConfig) -> None:
        self.engine = engine
        self.config = config

    async def run(self) -> int:
        from ..runtime.runner import serve
        from .adapter import adapt

        engine, config = adapt(self.engine, self.config)
        return await serve(engine, config)


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


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m backend_common.dynamo_compat.launch")
    parser.add_argument(
        "--source-dir", action="append", default=[], help="directory of dynamo.common.backend.*"
    )
    parser.add_argument("engine", help="MODULE:CLASS of the engine")
    parser.add_argument("engine_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    module_name, _, class_name = args.engine.partition(":")
    if not class_name:
        parser.error("engine must be MODULE:CLASS")
    aliases.install(args.source_dir)
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    run(engine_cls, args.engine_args)


if __name__ == "__main__":
    main(sys.argv[1:])
