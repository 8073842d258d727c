"""Run a Dynamo 1.6.1-style engine class, unmodified, on ``backend_common``.

    python -m backend_common.dynamo_compat.launch [--source-dir DIR]... MODULE:CLASS [ENGINE ARGS]

installs the module aliases (``aliases.install``; ``--source-dir`` for modules an engine keeps
under ``dynamo.common.backend``), imports ``MODULE``, and calls ``dynamo_compat.run(CLASS)``
with the remaining arguments as the engine's argv. For an engine whose source already imports
``backend_common.dynamo_compat``, none of this is needed: its own ``run`` call is enough.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import aliases


def main(argv: list[str] | None = None) -> None:
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
    from .run import run

    run(engine_cls, args.engine_args)


if __name__ == "__main__":
    main(sys.argv[1:])
